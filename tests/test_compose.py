"""docker-compose.yml and the Dockerfile: the one-command cluster deployment.

No Docker engine runs here. The file is checked twice: parsed as YAML against what a cluster
needs, and, where a compose client exists (`docker compose` or `docker-compose`), resolved by
`compose config`, which validates it against the Compose schema without an engine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
NODES = ("ray-head", "ray-worker", "evomerge")  # the services that run the evomerge image
ENV = {"EVOMERGE_TOKEN": "dashboard-token", "RAY_AUTH_TOKEN": "ab" * 32}


@pytest.fixture(scope="module")
def spec() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def command(service: dict) -> str:
    cmd = service["command"]
    return " ".join(cmd) if isinstance(cmd, list) else cmd


def env(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in service["environment"].items()}


def mounts(service: dict) -> dict[str, str]:
    """Container path -> source of each volume."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = v["source"]
        else:
            source, target, *_ = re.split(r":(?![^{]*})", v)  # not the `:-` in ${VAR:-x}
            out[target] = source
    return out


def size_bytes(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(text).lower()).groups()
    return int(number) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]


def test_services_and_volumes(spec: dict) -> None:
    assert {"postgres", *NODES} <= set(spec["services"])
    assert {"pgdata", "cache"} <= set(spec["volumes"])


def test_postgres_has_a_volume_and_a_healthcheck(spec: dict) -> None:
    pg = spec["services"]["postgres"]
    assert pg["image"].startswith("postgres:")
    assert mounts(pg)["/var/lib/postgresql/data"] == "pgdata"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])


def test_ray_head_runs_no_workers_and_is_health_checked(spec: dict) -> None:
    head = spec["services"]["ray-head"]
    cmd = command(head)
    assert "ray start --head" in cmd and "--port=6379" in cmd and "--block" in cmd
    assert "--num-cpus=0" in cmd and "--num-gpus=0" in cmd
    assert "health-check" in " ".join(head["healthcheck"]["test"])


def test_ray_worker_reserves_gpus_and_scales(spec: dict) -> None:
    worker = spec["services"]["ray-worker"]
    cmd = command(worker)
    assert "ray start --address=ray-head:6379" in cmd and "--block" in cmd
    assert "--num-gpus" not in cmd, "a worker offers every GPU it has (one actor per GPU)"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert size_bytes(worker["shm_size"]) >= 4 << 30, "Ray's object store lives in /dev/shm"
    # `--scale ray-worker=N`: nothing that pins one container (a name, a published port)
    assert "container_name" not in worker and "ports" not in worker
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_evomerge_uses_postgres_and_the_head_without_gpus(spec: dict) -> None:
    svc = spec["services"]["evomerge"]
    values = env(svc)
    assert re.match(r"postgresql\+psycopg://[^@]+@postgres:5432/\w+$", values["EVOMERGE_STORAGE"])
    assert values["RAY_ADDRESS"] == "ray-head:6379"
    assert "EVOMERGE_TOKEN" in values and "evomerge dashboard" in command(svc)
    assert "deploy" not in svc, "the coordinator and dashboard need no GPU"
    cmd = command(svc)  # a driver needs a local raylet: a node that takes no actors
    assert "ray start --address=ray-head:6379 --num-cpus=0 --num-gpus=0" in cmd
    assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert svc["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_stopping_the_evomerge_container_stops_its_runs_in_time(spec: dict) -> None:
    """The dashboard (the container's main process, by `exec`) stops this host's runs on
    SIGTERM, and the container's grace period outlasts the dashboard's wait for them."""
    from evomerge.dashboard.app import STOP_RUNS_WAIT_S

    svc = spec["services"]["evomerge"]
    assert "exec evomerge dashboard" in command(svc)
    assert "--stop-runs-on-exit" in command(svc)
    grace = re.fullmatch(r"(\d+)s", svc["stop_grace_period"])
    assert grace and int(grace[1]) >= STOP_RUNS_WAIT_S + 10


def test_every_node_mounts_the_models_at_the_same_path_and_shares_the_cluster(
    spec: dict,
) -> None:
    services = spec["services"]
    for name in NODES:
        svc = services[name]
        assert mounts(svc)["/models"] == "${EVOMERGE_MODELS:-./models}"
        assert mounts(svc)["/cache"] == "cache"
        values = env(svc)
        assert values["EVOMERGE_CACHE"] == "/cache"
        assert values["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" in values
        assert values["EVOMERGE_STORAGE"] == env(services["evomerge"])["EVOMERGE_STORAGE"]
    assert len({mounts(services[n])["/models"] for n in NODES}) == 1


def test_dockerfile_installs_every_package_and_the_context_is_small() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for folder in ("evomerge", "workers", "storage", "configs"):
        assert re.search(rf"^COPY {folder} \./{folder}$", dockerfile, re.M), folder
    # The lock, hash-checked, before the project, which installs nothing more.
    lock = dockerfile.index("pip install --require-hashes --no-deps -r requirements.lock")
    assert lock < dockerfile.index("pip install --no-deps --no-build-isolation -e .")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "models"} <= set(ignored)


def compose_client() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def run_config(client: list[str], extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ENV}
    return subprocess.run(
        [*client, "-f", str(COMPOSE), "config"],
        cwd=ROOT,
        env={**environ, **extra_env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def client() -> list[str]:
    found = compose_client()
    if found is None:
        pytest.skip("no compose client: neither `docker compose` nor `docker-compose` exists")
    return found


def test_compose_config_resolves(client: list[str]) -> None:
    out = run_config(client, ENV)
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    services = resolved["services"]
    for name in NODES:
        values = env(services[name])
        assert values["RAY_AUTH_TOKEN"] == ENV["RAY_AUTH_TOKEN"]
        assert values["EVOMERGE_STORAGE"] == (
            "postgresql+psycopg://evomerge:evomerge@postgres:5432/evomerge"
        )
        assert mounts(services[name])["/models"] == str(ROOT / "models")
    assert env(services["evomerge"])["EVOMERGE_TOKEN"] == ENV["EVOMERGE_TOKEN"]
    assert env(services["postgres"])["POSTGRES_PASSWORD"] == "evomerge"


@pytest.mark.parametrize("missing", sorted(ENV))
def test_compose_config_requires_the_tokens(client: list[str], missing: str) -> None:
    out = run_config(client, {k: v for k, v in ENV.items() if k != missing})
    assert out.returncode != 0 and missing in out.stderr
