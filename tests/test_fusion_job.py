"""A fusion job on tiny checkpoints: validation, the fused data, training and its resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.config import ConfigError
from evomerge.fusion.distributions import distributions, load
from evomerge.fusion.job import FusionConfig, prepare, train
from evomerge.killpoints import ENV, FUSION_KILL_POINTS
from evomerge.zoo.tokenizer import VOCAB, build_tokenizer
from storage import Store
from tests.fixtures_models import make_family
from tests.test_coordinator import _evomerge

LINES = ["cat dog sun", "12+3=15", "ABC>CBA", "red blue big:", "sun moon star"] * 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama target, a tiny Llama source and a tiny Qwen2 one (whose tokenizer class
    drops the spaces the zoo's character tokenizer keeps: another tokenisation), a corpus."""
    root = tmp_path_factory.mktemp("fusejob")
    out = {
        "target": make_family(root / "t", "llama", n_sources=0, seed=5).base,
        "source": make_family(root / "s", "llama", n_sources=0, seed=6).base,
        "qwen": make_family(root / "q", "qwen2", n_sources=0, seed=7).base,
    }
    for folder in out.values():
        build_tokenizer().save_pretrained(folder)
    out["corpus"] = root / "corpus.txt"
    out["corpus"].write_text("\n".join(LINES) + "\n")
    return out


def config(folders, **changes) -> FusionConfig:
    data = {
        "name": "f",
        "target": str(folders["target"]),
        "sources": [str(folders["source"])],
        "corpus": str(folders["corpus"]),
        "k": 4,
        "train": {"steps": 6, "batch": 4, "checkpoint_every": 2, "lr": 1e-3},
    }
    return FusionConfig.model_validate(data | changes)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))


def test_one_source_with_the_targets_tokenizer_is_fused_unchanged(folders) -> None:
    cfg = config(folders)
    examples = prepare(cfg)
    file = distributions(folders["source"], folders["corpus"], 4, max_length=128)
    for example, (tokens, ids, probs) in zip(examples, load(file), strict=True):
        assert example.tokens.tolist() == tokens.tolist()
        for row in range(1, len(tokens)):  # the same tokens, with the same probabilities
            fused = zip(example.ids[row].tolist(), example.probs[row].tolist(), strict=True)
            got = {i: p for i, p in fused if p > 0}
            # the tiny model's 96 logits outnumber the 74 tokens of the tokenizer: ids past
            # the vocabulary map to no token and drop out
            pairs = zip(ids[row].tolist(), probs[row].tolist(), strict=True)
            known = [(i, p) for i, p in pairs if i < len(VOCAB) and p > 0]
            total = sum(p for _, p in known)
            assert got == pytest.approx({i: p / total for i, p in known}, abs=1e-6)


def test_a_resumed_job_ends_with_the_weights_of_an_uninterrupted_one(folders, tmp_path) -> None:
    cfg = config(folders, sources=[str(folders["source"]), str(folders["qwen"])], fusion="avg_ce")
    examples = prepare(cfg)
    whole = train(cfg, examples, tmp_path / "whole")
    short = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 4})})
    train(short, examples, tmp_path / "cut")  # a job killed after its step-4 checkpoint
    resumed = train(cfg, examples, tmp_path / "cut")
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    steps = json.loads((tmp_path / "cut" / "checkpoint" / "losses.json").read_text())
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    start = load_file(folders["target"] / "model.safetensors")
    assert any(not torch.equal(a[n], start[n]) for n in a)


def test_lambda_one_is_the_clm_only_control(folders, tmp_path) -> None:
    """With λ = 1 the fused distributions have no say: any fusion trains the same weights."""
    clm = config(folders, lam=1.0)
    examples = prepare(clm)
    flat = [e.__class__(e.tokens, e.ids, torch.full_like(e.probs, 0.25)) for e in examples]
    a = load_file(train(clm, examples, tmp_path / "a") / "model.safetensors")
    b = load_file(train(clm, flat, tmp_path / "b") / "model.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"lam": 1.5}, "lam"),
        ({"fusion": "max_ce"}, "fusion"),
        ({"alignment": "fuzzy"}, "alignment"),
    ],
)
def test_bad_settings_are_refused_by_field(folders, change, error) -> None:
    with pytest.raises(ValueError, match=error):
        config(folders, **change)


def test_bad_inputs_are_refused_before_anything_is_written(folders, tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="corpus file is empty"):
        config(folders, corpus=str(empty)).check()
    with pytest.raises(ConfigError, match="corpus file not found"):
        config(folders, corpus=str(tmp_path / "nope.txt")).check()
    accents = tmp_path / "accents.txt"
    accents.write_text("café au lait\n")
    with pytest.raises(ConfigError, match="cannot encode corpus line 1"):
        config(folders, corpus=str(accents)).check()
    vision = tmp_path / "vision"
    vision.mkdir()
    (vision / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ConfigError, match="'vit' is not a causal language model"):
        config(folders, sources=[str(vision)]).check()
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("point", [f"{FUSION_KILL_POINTS[0]}:7", f"{FUSION_KILL_POINTS[1]}:3"])
def test_a_job_sigkilled_mid_training_resumes_to_the_uninterrupted_weights(
    folders, tmp_path, point
) -> None:
    """`evomerge fuse` SIGKILLed at a step (or between a checkpoint's two renames), run again,
    ends with the weights of a job never interrupted, and the store holds every step once."""
    url = f"sqlite:///{tmp_path / 'fuse.db'}"
    env = {**os.environ, "EVOMERGE_STORAGE": url, "COLUMNS": "300"}
    env["EVOMERGE_CACHE"] = str(tmp_path / "cache")
    data = config(folders, sources=[str(folders["source"]), str(folders["qwen"])]).model_dump(
        mode="json", exclude_none=True
    )
    data["train"] |= {"steps": 12, "checkpoint_every": 3}
    data["workers"] = 0  # in the CLI's process, which the kill point takes down
    for name in ("whole", "cut"):
        (tmp_path / f"{name}.yaml").write_text(
            yaml.safe_dump({**data, "name": name, "out": str(tmp_path / name)})
        )
    proc = _evomerge("fuse", str(tmp_path / "whole.yaml"), env=env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    proc = _evomerge("fuse", str(tmp_path / "cut.yaml"), env={**env, ENV: point})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out
    store = Store(url)
    assert store.fusion_job("cut").status == "running"
    assert len(store.fusion_steps("cut")) == 6  # the checkpoint of step 6 reached the store
    proc = _evomerge("fuse", str(tmp_path / "cut.yaml"), env=env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "resuming" in out and store.fusion_job("cut").status == "finished"
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert store.fusion_steps("cut") == store.fusion_steps("whole")
    assert [s["step"] for s in store.fusion_steps("cut")] == list(range(1, 13))


def test_one_process_runs_a_job_and_a_stopped_container_stops_it(folders, tmp_path) -> None:
    """A second `evomerge fuse` of a running job is refused (exit 3); `evomerge stop` stops
    it, and so does the container's dashboard stopping its host's work (SIGTERM): `stopped`,
    resumable, not `running` until its heartbeat goes stale."""
    from typer.testing import CliRunner

    from evomerge.cli import app
    from evomerge.dashboard.launch import stop_host_runs

    url = f"sqlite:///{tmp_path / 'lease.db'}"
    env = {**os.environ, "EVOMERGE_STORAGE": url, "COLUMNS": "300"}
    data = config(folders, name="long", workers=0).model_dump(mode="json", exclude_none=True)
    data["train"] |= {"steps": 1_000_000, "checkpoint_every": 100_000}
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump({**data, "out": str(tmp_path / "long")}))
    store = Store(url)
    store.migrate()

    def running() -> subprocess.Popen:
        proc = _evomerge("fuse", str(path), env=env)
        deadline = time.monotonic() + 120
        while (job := store.fusion_job("long", missing_ok=True)) is None or job.pid != proc.pid:
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
            time.sleep(0.2)
        return proc

    first = running()
    second = _evomerge("fuse", str(path), env=env)
    out, _ = second.communicate(timeout=120)
    said = " ".join(out.split())
    assert second.returncode == 3 and f"already being run by pid {first.pid}" in said, out
    stop = CliRunner().invoke(app, ["stop", "long", "--storage", url])
    assert stop.exit_code == 0 and "stop requested for fusion job long" in stop.output
    out, _ = first.communicate(timeout=60)  # at its next heartbeat (2 s)
    assert first.returncode != 0 and "stop requested: stopping now" in out, out
    assert "`evomerge fuse" in out and "resumes it" in out, out
    assert store.fusion_job("long", stale_after_s=30).status == "stopped"
    again = running()  # resumed: the old request is not this run's
    assert stop_host_runs(store, stale_after_s=30, wait_s=60) == {}
    out, _ = again.communicate(timeout=60)
    assert again.returncode != 0 and "resuming it" in out and "resumes it" in out, out
    assert store.fusion_job("long", stale_after_s=30).status == "stopped"


def test_ray_train_with_one_worker_trains_the_weights_of_training_in_process(
    folders, tmp_path, ray_local
) -> None:
    """The same job on one Ray Train worker and in this process: the same weights; on two
    data-parallel workers it trains and records every step."""
    from evomerge.fusion.job import train_on_ray

    url = f"sqlite:///{tmp_path / 'ray.db'}"
    store = Store(url)
    store.migrate()
    cfg = config(folders, workers=1)
    examples = prepare(cfg)
    local = train(cfg, examples, tmp_path / "local")
    store.create_fusion_job("f", cfg.to_yaml(), str(tmp_path / "ray1"))
    remote = train_on_ray(cfg, examples, tmp_path / "ray1", url)
    a, b = load_file(local / "model.safetensors"), load_file(remote / "model.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [s["step"] for s in store.fusion_steps("f")] == list(range(1, 7))
    two = config(folders, name="f2", workers=2)
    store.create_fusion_job("f2", two.to_yaml(), str(tmp_path / "ray2"))
    model = train_on_ray(two, examples, tmp_path / "ray2", url)
    assert (model / "model.safetensors").is_file()
    assert [s["step"] for s in store.fusion_steps("f2")] == list(range(1, 7))


def test_the_dashboard_lists_jobs_draws_losses_and_starts_a_config(folders, tmp_path) -> None:
    from tests.test_dashboard import make_client

    url = f"sqlite:///{tmp_path / 'dash.db'}"
    store = Store(url)
    store.migrate()
    store.create_fusion_job("seen", "name: seen\n", str(tmp_path / "seen"))
    steps = [{"step": i, "loss": 3 - i / 10, "clm": 3.0, "fusion": 2 - i / 10} for i in range(1, 9)]
    store.record_fusion_steps("seen", steps)
    scores = {"fused": {"add": 0.5, "mean": 0.5}, "target": {"add": 0.25, "mean": 0.25}}
    store.set_fusion_job("seen", "finished", evaluation=scores)
    dirs = {n: tmp_path / n for n in ("configs", "exports", "runs", "models")}
    for folder in dirs.values():
        folder.mkdir()
    (dirs["configs"] / "fusion").mkdir()
    data = config(folders, name="started", workers=0).model_dump(mode="json", exclude_none=True)
    (dirs["configs"] / "fusion" / "small.yaml").write_text(yaml.safe_dump(data))
    with make_client(url, dirs) as client:
        page = client.get("/fusion").text
        assert "seen" in page and "finished" in page and "small.yaml" in page
        page = client.get("/fusion/seen").text
        assert 'class="series s0"' in page and 'class="series s2"' in page
        assert "0.250" in page or "0.25" in page
        answer = client.post("/fusion", data={"config": "small.yaml"})
        assert answer.status_code == 303 and answer.headers["location"] == "/fusion/started"
        assert list((dirs["runs"] / "started").glob("*-fuse.log"))
        bad = client.post("/fusion", data={"config": "../../etc/passwd"})
        assert bad.status_code == 400
        assert 'name="stop"' not in client.get("/fusion/seen").text  # finished: nothing to stop
        store.create_fusion_job("live", "name: live\n", str(tmp_path / "live"))
        store.claim_fusion_job("live", os.getpid(), "here", stale_after_s=30)
        assert 'name="stop"' in client.get("/fusion/live").text
        stopped = client.post("/fusion/live/stop")
        assert stopped.status_code == 303 and stopped.headers["location"] == "/fusion/live"
        assert store.fusion_heartbeat("live", os.getpid())  # the job learns it at its next beat
        assert "(stop requested)" in client.get("/fusion/live").text
        assert client.post("/fusion/nope/stop").status_code == 404


def test_a_fused_model_is_a_source_of_a_merge_with_its_target(folders, tmp_path) -> None:
    """Fuse, then merge (as FuseChat does): the fused checkpoint loads into a SourceSet beside
    its target, and task arithmetic at weight 0.5 lands half way between the two; it is a
    routed model of a data-flow path too."""
    from evomerge.merge import build
    from evomerge.models import SourceSet
    from evomerge.recipe import Recipe

    cfg = config(folders)
    fused = train(cfg, prepare(cfg), tmp_path / "job")
    sources = SourceSet.load(folders["target"], [fused], names=["fused"], base_name="target")
    groups = sources.groups(2)
    recipe = Recipe(
        method="task_arithmetic",
        base="target",
        sources=("fused",),
        groups=groups,
        params={"weight": ((0.5,),) * len(groups)},
    )
    model = sources.new_model("float32")
    build(recipe, sources, model)
    start = load_file(folders["target"] / "model.safetensors")
    end = load_file(fused / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(model.state_dict()[name], (start[name] + end[name]) / 2)

    # ... and a routed model of a data-flow path: the target's layers, then the fused one's
    from transformers import AutoModelForCausalLM

    from evomerge.dataflow import route
    from evomerge.recipe import DataFlow

    flow = DataFlow(
        models=("target", "fused"),
        path=((0, 0), (0, 1), (1, 2), (1, 3), (0, 3)),
        scales=(1.0, 1.0, 1.0, 1.0, 1.0),
    )
    loaded = {
        n: AutoModelForCausalLM.from_pretrained(f).eval()
        for n, f in (("target", folders["target"]), ("fused", fused))
    }
    path = route(flow, None, loaded)
    with torch.inference_mode():
        logits = path(input_ids=torch.tensor([[1, 20, 21, 22]])).logits
    assert logits.shape[:2] == (1, 4) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).parents[1].glob("configs/fusion/*.yaml")), ids=lambda p: p.name
)
def test_shipped_fusion_configs_validate(path: Path) -> None:
    cfg = FusionConfig.load(path)
    assert cfg.control().lam == 1.0 and cfg.control().out_dir() != cfg.out_dir()
    assert cfg.corpus.startswith("zoo:") or Path(cfg.corpus).is_absolute()
