# One image for the coordinator, the dashboard and the Ray workers (docker-compose.yml).
# Every package comes from requirements.lock, hash-checked, except torch: PyPI's Linux torch
# wheel carries CUDA (and pulls its NVIDIA libraries), so the default image runs on GPU nodes as
# it is; for another CUDA build or a smaller CPU-only image pick the wheel index, e.g.
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126   (or .../whl/cpu)
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
WORKDIR /app
COPY requirements.lock ./
RUN pip install --require-hashes --no-deps -r requirements.lock
RUN if [ -n "$TORCH_INDEX" ]; then pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX"; \
    else pip install "$TORCH_SPEC"; fi
COPY pyproject.toml README.md ./
COPY evomerge ./evomerge
COPY workers ./workers
COPY storage ./storage
COPY configs ./configs
RUN pip install --no-deps --no-build-isolation -e . && pip check
ENTRYPOINT []
CMD ["evomerge", "--help"]
