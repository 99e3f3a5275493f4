"""Memory plans: numbers from safetensors headers, `evomerge plan`, and `run` refusing a
study that fits no placement before it writes anything."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.config import ConfigError, StudyConfig
from evomerge.memory import plan_worker
from evomerge.models import SourceSet
from evomerge.placement import Placement
from tests.fixtures_models import NAMES


def _config(tmp_path, fam, **workers) -> str:
    cfg = {
        "name": "fit",
        "zoo": "test",
        "base": str(fam.base),
        "sources": [str(p) for p in fam.sources],
        "method": "ties",
        "search": {"weight": {"low": 0, "high": 1}},
        "fitness": {"tasks": ["zoo:add"]},
        "workers": {"count": 1, **workers},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_plan_counts_the_bytes_a_placement_keeps(tiny_llama_bf16_sharded):
    fam = tiny_llama_bf16_sharded
    plan = plan_worker(
        str(fam.base), tuple(map(str, fam.sources)), (), "bfloat16", "auto", None, "unknown"
    )
    loaded = SourceSet.load(fam.base, fam.sources, names=NAMES[:2], placement="device")
    names = [e.name for e in loaded.entries]
    kept = sum(t.nbytes for ts in loaded.weights.stream(names) for t in ts)
    assert plan.needs[Placement.DEVICE].sources == kept
    assert plan.needs[Placement.HOST].sources == 0 and plan.shared == kept
    assert plan.params == sum(e.numel for e in loaded.entries)
    assert plan.needs[Placement.DEVICE].candidate == 2 * plan.params
    assert plan.choice is Placement.DEVICE  # nothing known about the device: no refusal
    # statistics: page cache on every node; a GPU worker's DARE tables on its device
    assert plan.shared_statistics > 0
    assert all(n.statistics == 0 for n in plan.needs.values())
    args = (str(fam.base), tuple(map(str, fam.sources)), (), "bfloat16", "auto", None, "unknown")
    on_gpu = plan_worker(*args, gpu=True)
    tables = len(loaded.entries) * len(fam.sources) * 4 * (1 << 16)
    assert on_gpu.shared_statistics == plan.shared_statistics - tables > 0
    assert all(n.statistics == tables for n in on_gpu.needs.values())


def test_placement_is_validated():
    with pytest.raises(ConfigError, match=r"workers.sources: Input should be 'device', 'host'"):
        StudyConfig.from_yaml(
            "name: x\nbase: b\nsources: [a]\nfitness: {tasks: [t]}\nworkers: {sources: gpu}"
        )


def test_plan_command_shows_the_choice(tmp_path, tiny_llama):
    result = CliRunner().invoke(app, ["plan", _config(tmp_path, tiny_llama)])
    assert result.exit_code == 0, result.output
    assert "workers.sources: auto -> device" in result.output
    asked = _config(tmp_path, tiny_llama, sources="host", memory_gb=64)
    result = CliRunner().invoke(app, ["plan", asked])
    assert "workers.sources: host -> host" in result.output


def test_run_refuses_a_study_that_fits_no_placement(tmp_path, tiny_llama):
    config = _config(tmp_path, tiny_llama, memory_gb=0.001)
    db = tmp_path / "study.db"
    result = CliRunner().invoke(app, ["run", config, "--storage", f"sqlite:///{db}"])
    assert result.exit_code == 2, result.output
    assert "fits no placement" in result.output and "workers.memory_gb" in result.output
    assert not db.exists()


HEADROOM = 64 << 20  # address space a worker may still map once its limit is set


def _vm_size() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmSize")).split()[1]) * 1024


def serve_under_a_limit(spec_json: str, recipe_json: str) -> None:
    """In a fresh process: a real host-placement worker scores a small trial, then its address
    space is limited to what it maps plus HEADROOM, and it scores a trial whose evaluation
    batch cannot fit there, then the small one again. Prints the three results as JSON."""
    from workers.actor import CandidateWorker, WorkerSpec

    worker = CandidateWorker(WorkerSpec.model_validate_json(spec_json))
    results = [worker.evaluate(recipe_json, "held-out")]
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + HEADROOM, hard))
    results += [worker.evaluate(recipe_json, "search"), worker.evaluate(recipe_json, "held-out")]
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    print(json.dumps([asdict(r) for r in results]))


def _long_and_short_task(folder: Path) -> Path:
    """A perplexity task whose search split is 64 texts of 4,000 characters (one batch of
    them needs gigabytes) and whose held-out split is 8 short lines."""
    long = [{"text": ("sky tree gold " * 300)[:4000]}] * 64
    short = [{"text": "big hot wolf rock milk."}] * 8
    for split, rows in (("search", long), ("held-out", short)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = folder / "long.yaml"
    splits = {"search": "search.jsonl", "held-out": "held-out.jsonl"}
    task.write_text(yaml.safe_dump({"name": "long", "kind": "perplexity", "splits": splits}))
    return task


def test_an_evaluation_out_of_memory_fails_the_trial_and_the_worker_serves_on(tmp_path, zoo_dir):
    """A real allocation failure (RLIMIT_AS): the trial is a FAIL naming the placement and
    both batch sizes (128, then 64), and the same worker completes the next trial."""
    from evomerge.recipe import Recipe, layer_group_names
    from evomerge.zoo import resolve_model
    from workers.actor import WorkerSpec

    experts = ("zoo:add", "zoo:reverse")
    spec = WorkerSpec(
        base="zoo:base",
        base_path=str(resolve_model("zoo:base", zoo_dir)),
        sources=experts,
        source_paths=tuple(str(resolve_model(e, zoo_dir)) for e in experts),
        tasks=(str(_long_and_short_task(tmp_path)),),
        weights=(1.0,),
        limit=None,
        heldout_limit=None,
        zoo_dir=str(zoo_dir),
        dtype="float32",
        torch_threads=1,
        placement="host",
    )
    groups = layer_group_names(4)
    recipe = Recipe(
        method="ties",
        base="zoo:base",
        sources=experts,
        groups=groups,
        params={"weight": ((0.5, 0.5),) * len(groups), "density": ((0.6, 0.6),) * len(groups)},
    )
    code = (
        "import sys; from tests.test_memory import serve_under_a_limit; "
        "serve_under_a_limit(sys.argv[1], sys.argv[2])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, spec.model_dump_json(), recipe.to_json()],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"EVOMERGE_CACHE": str(tmp_path / "cache")},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    before, oom, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert before["error"] is None and before["fitness"] is not None
    assert oom["fitness"] is None and oom["error"].startswith("OutOfMemory: out of memory"), oom
    assert "host placement, batch size 128, then 64" in oom["error"], oom["error"]
    assert after["error"] is None and after["fitness"] == before["fitness"]
