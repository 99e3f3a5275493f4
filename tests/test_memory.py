"""Memory plans: numbers from safetensors headers, `evomerge plan`, and `run` refusing a
study that fits no placement before it writes anything."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from transformers import AutoConfig
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.config import ConfigError, StudyConfig
from evomerge.memory import plan_worker
from evomerge.models import SourceSet
from evomerge.placement import Placement
from tests.fixtures_models import NAMES


def _words_task(folder: Path) -> str:
    """A generation task in the tiny models' words (their tokenizer knows no digits)."""
    for split in ("search", "held-out"):
        rows = [
            {"prompt": " ".join(f"w{i + j}" for j in range(12)), "answer": "w1"} for i in range(8)
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = {"search": "search.jsonl", "held-out": "held-out.jsonl"}
    task = folder / "words.yaml"
    task.write_text(yaml.safe_dump({"name": "words", "kind": "generate", "splits": splits}))
    return str(task)


def _config(tmp_path, fam, extra=None, tasks=None, **workers) -> str:
    cfg = (extra or {}) | {
        "name": "fit",
        "zoo": "test",
        "base": str(fam.base),
        "sources": [str(p) for p in fam.sources],
        "method": "ties",
        "search": {"weight": {"low": 0, "high": 1}},
        "fitness": {"tasks": tasks or [_words_task(tmp_path)]},
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


def test_the_evaluation_plan_follows_the_batch_the_generation_and_the_route(tiny_llama):
    """Likelihood scoring grows with the batch; generation holds a KV cache for the prompt
    and the new tokens on every layer a token passes, and a route's hops each keep one."""
    from evomerge.memory import EVAL_TOKENS

    fam = tiny_llama
    args = (str(fam.base), tuple(map(str, fam.sources)), (), "bfloat16", "auto", None, "-")
    config = AutoConfig.from_pretrained(fam.base)
    tokens, vocab = EVAL_TOKENS, config.vocab_size
    for batch in (128, 64):  # the batch's bf16 logits, one row's float32 pair, activations
        scoring = (batch * 2 + 8) * tokens * vocab + batch * tokens * 16 * config.hidden_size
        assert plan_worker(*args, batch=batch).needs[Placement.HOST].evaluation == scoring
    generating = plan_worker(*args, batch=8, generate=100, likelihood=False)
    kv_heads, head_dim = (
        config.num_key_value_heads,
        config.hidden_size // config.num_attention_heads,
    )
    layers = config.num_hidden_layers
    kv = 8 * (EVAL_TOKENS + 100) * layers * 2 * kv_heads * head_dim * 2
    rest = 8 * EVAL_TOKENS * 16 * config.hidden_size + 8 * 4 * config.vocab_size
    assert generating.needs[Placement.HOST].evaluation == kv + rest
    assert "evaluation at batch 8 (fitness.batch_size)" in generating.lines()[0]
    assert "of rows up to 256 tokens (256 assumed for lm-eval tasks)" in generating.lines()[0]
    # the tasks' widest row, where evomerge reads them; lm-eval's rows count 256 at least
    measured = plan_worker(*args, batch=8, generate=100, likelihood=False, longest=40)
    kv40 = 8 * (40 + 100) * layers * 2 * kv_heads * head_dim * 2
    rest40 = 8 * 40 * 16 * config.hidden_size + 8 * 4 * config.vocab_size
    assert measured.needs[Placement.HOST].evaluation == kv40 + rest40
    assert "of rows up to 40 tokens (the tasks')" in measured.lines()[0]
    with_lm_eval = plan_worker(*args, longest=40, lm_eval=True)
    assert (with_lm_eval.tokens, with_lm_eval.assumed) == (EVAL_TOKENS, True)
    assert plan_worker(*args, longest=900, lm_eval=True).tokens == 900
    routed = (str(fam.sources[0]),)
    route = plan_worker(
        None,
        (),
        (str(fam.base), *routed),
        "bfloat16",
        "auto",
        None,
        "-",
        batch=8,
        generate=100,
        likelihood=False,
        repeats=3,
    )
    assert route.needs[Placement.HOST].evaluation == kv * 3 * 2 + rest  # 3 x (A's + B's layers)


def test_a_worker_plans_the_widest_row_of_its_tasks(tmp_path, zoo_dir):
    """The evaluation is planned at the widest row the study's tasks hold in the splits it
    scores, encoded by the base's tokenizer: 4,000-character texts need far more than the
    test zoo's short prompts."""
    from transformers import AutoTokenizer

    from evomerge.zoo import resolve_model
    from workers.actor import WorkerSpec

    experts = ("zoo:add", "zoo:reverse")
    base = str(resolve_model("zoo:base", zoo_dir))

    def plan(task: str):
        return WorkerSpec(
            base="zoo:base",
            base_path=base,
            sources=experts,
            source_paths=tuple(str(resolve_model(e, zoo_dir)) for e in experts),
            tasks=(task,),
            weights=(1.0,),
            limit=None,
            heldout_limit=None,
            zoo_dir=str(zoo_dir),
            dtype="float32",
            torch_threads=1,
        ).plan()

    long = plan(str(_long_and_short_task(tmp_path)))
    widest = len(AutoTokenizer.from_pretrained(base)(("sky tree gold " * 300)[:4000]).input_ids)
    assert (long.tokens, long.assumed) == (widest, False)
    assert f"of rows up to {widest} tokens (the tasks')" in long.lines()[0]
    short = plan("zoo:add")
    assert short.tokens < 64 < widest and not short.assumed
    assert short.needs[Placement.HOST].evaluation < long.needs[Placement.HOST].evaluation / 16


def test_the_study_sets_the_evaluation_batch(tmp_path, tiny_llama, zoo_dir):
    from workers.actor import WorkerSpec

    config = StudyConfig.load(_config(tmp_path, tiny_llama))
    assert WorkerSpec.from_config(config).batch_size == 128
    smaller = config.model_copy(
        update={"fitness": config.fitness.model_copy(update={"batch_size": 16})}
    )
    spec = WorkerSpec.from_config(smaller)
    assert spec.batch_size == 16 and spec.plan().batch == 16


def test_allocation_failures_are_told_from_other_errors():
    """cuBLAS failing to allocate its workspace on a full GPU is an out-of-memory too."""
    from evomerge.memory import out_of_memory

    full = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`")
    assert out_of_memory(full) and out_of_memory(MemoryError())
    assert not out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))


def test_placement_is_validated():
    with pytest.raises(ConfigError, match=r"workers.sources: Input should be 'device', 'host'"):
        StudyConfig.from_yaml(
            "name: x\nbase: b\nsources: [a]\nfitness: {tasks: [t]}\nworkers: {sources: gpu}"
        )


def test_plan_command_shows_the_choice(tmp_path, tiny_llama, zoo_dir):
    result = CliRunner().invoke(app, ["plan", _config(tmp_path, tiny_llama)])
    assert result.exit_code == 0, result.output
    assert "workers.sources: auto -> device" in result.output
    assert re.search(r"^0\.0*[1-9]\d*M parameters a model", result.output, re.M), result.output
    asked = _config(tmp_path, tiny_llama, sources="host", memory_gb=64)
    result = CliRunner().invoke(app, ["plan", asked])
    assert "workers.sources: host -> host" in result.output


def test_run_refuses_a_study_that_fits_no_placement(tmp_path, tiny_llama, zoo_dir):
    config = _config(tmp_path, tiny_llama, memory_gb=0.001)
    db = tmp_path / "study.db"
    result = CliRunner().invoke(app, ["run", config, "--storage", f"sqlite:///{db}"])
    assert result.exit_code == 2, result.output
    assert "fits no placement" in result.output and "workers.memory_gb" in result.output
    assert not db.exists()


def test_run_refuses_tasks_the_base_tokenizer_cannot_encode(tmp_path, tiny_llama, zoo_dir):
    """Planning reads every row the workers will score: a task in characters the base's
    tokenizer maps to its unknown token is refused, naming the row, before a worker loads
    anything (every one of its trials would fail)."""
    config = _config(tmp_path, tiny_llama, tasks=["zoo:add"])
    db = tmp_path / "study.db"
    result = CliRunner().invoke(app, ["run", config, "--storage", f"sqlite:///{db}"])
    assert result.exit_code == 2, result.output
    assert "task 'add' (row 0): the tokenizer cannot encode" in " ".join(result.output.split())
    assert not db.exists()


HEADROOM = 64 << 20  # address space a worker may still map once its limit is set


def _vm_size() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmSize")).split()[1]) * 1024


def serve_under_a_limit(spec_json: str, recipe_json: str) -> None:
    """In a fresh process: a real host-placement worker scores a small trial, then its address
    space is limited to what it maps plus HEADROOM, and it scores twice a trial whose
    evaluation batch cannot fit there, then the small one again. Prints the four results as
    JSON."""
    from workers.actor import CandidateWorker, WorkerSpec

    worker = CandidateWorker(WorkerSpec.model_validate_json(spec_json))
    results = [worker.evaluate(recipe_json, "held-out")]
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + HEADROOM, hard))
    results += [worker.evaluate(recipe_json, "search") for _ in range(2)]
    results.append(worker.evaluate(recipe_json, "held-out"))
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
    both batch sizes (128, then 64); the worker keeps the halved batch (its next trial of the
    split starts at 64), and completes the next trial that fits."""
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
    before, oom, again, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert before["error"] is None and before["fitness"] is not None
    assert oom["fitness"] is None and oom["error"].startswith("OutOfMemory: out of memory"), oom
    assert "host placement, batch size 128, then 64" in oom["error"], oom["error"]
    assert "host placement, batch size 64, then 32" in again["error"], again["error"]
    assert after["error"] is None and after["fitness"] == before["fitness"]


def test_plan_covers_the_route_stage_of_ps_dfs(tmp_path, tiny_llama, zoo_dir):
    """PS+DFS is planned whole before stage 1 runs: stage 2's routes keep a KV cache per
    hop, so it can need more than stage 1, and `run` refuses when it cannot fit."""
    from evomerge.cli.plan import stage_plans

    route = {"dataflow": {"b": str(tiny_llama.sources[0]), "repeats": 3}}
    config = StudyConfig.load(_config(tmp_path, tiny_llama, route))
    one, two = stage_plans(config).values()
    assert two.needs[Placement.HOST].evaluation > one.needs[Placement.HOST].evaluation
    between = (one.needs[Placement.HOST].total + two.needs[Placement.HOST].total) / 2 / 0.9
    tight = _config(tmp_path, tiny_llama, route, sources="host", memory_gb=between / 2**30)
    result = CliRunner().invoke(app, ["plan", tight])
    assert result.exit_code == 2, result.output
    assert "study fit:" in result.output and "study fit-dfs:" in result.output
    db = tmp_path / "study.db"
    result = CliRunner().invoke(app, ["run", tight, "--storage", f"sqlite:///{db}"])
    assert result.exit_code == 2 and "study 'fit-dfs' does not fit" in result.output, result.output
    assert not db.exists()
