"""The test-size toy zoo, built once into the user cache and reused by every test run.

`task_arithmetic` is a ten-line merge (base + λ·Σ task vectors) for the zoo's own tests;
the real merge engine is `evomerge.merge`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from evomerge.zoo import build_zoo


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    return build_zoo("test", progress=False)


def task_arithmetic(base: Path, experts: list[Path], weight: float) -> LlamaForCausalLM:
    """base + weight · Σ (expert − base), tensor by tensor."""
    model = AutoModelForCausalLM.from_pretrained(base)
    merged = model.state_dict()
    start = {k: v.clone() for k, v in merged.items()}
    for path in experts:
        expert = AutoModelForCausalLM.from_pretrained(path).state_dict()
        with torch.no_grad():
            for k, v in merged.items():
                v += weight * (expert[k] - start[k])
    return model.eval()
