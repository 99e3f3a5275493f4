"""Memory plans: numbers from safetensors headers, `evomerge plan`, and `run` refusing a
study that fits no placement before it writes anything."""

from __future__ import annotations

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
