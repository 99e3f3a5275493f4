"""The GPU worker path: bf16 builds on the GPU, and a real study on `num_gpus=1` Ray actors.

python -m benchmarks.gpu_workers [--study-trials 24] [--reps 5]

Needs a CUDA GPU (it exits saying so otherwise). Two parts, one run:

1. Build: a randomly initialised Llama-shaped family (base + 3 sources, bf16 checkpoints,
   the merge_build benchmark's "full" shape) loaded as a SourceSet on the GPU; median time of
   `build` into a resident bf16 candidate per method, against a device-to-device copy of the
   bytes the build reads and writes (the bandwidth bound, timed in the same run).
2. Study: the real coordinator on the test-size toy zoo with `gpus_per_worker: 1` (one actor
   per GPU) and `dtype: bfloat16`, into SQLite; median build and eval seconds per trial from
   the trial table, and the device each worker reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.merge_build import SHAPES, SOURCES, checkpoints, copier, recipe
from benchmarks.scale import seconds
from evomerge.config import StudyConfig
from evomerge.coordinator import Coordinator
from evomerge.models import SourceSet
from evomerge.zoo import build_zoo
from storage import Store

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")
STUDY = """
name: gpu
zoo: test
base: zoo:base
sources: [zoo:add, zoo:reverse, zoo:translate]
method: dare_ties
dtype: bfloat16
search: {{weight: {{low: 0, high: 1.5}}, density: {{low: 0.1, high: 1}}}}
fitness: {{tasks: [zoo:add, zoo:reverse, zoo:translate], limit: 64, heldout_limit: 64}}
budget: {{trials: {trials}, heldout_top_k: 2}}
workers: {{count: 1, gpus_per_worker: 1}}
"""


def build_part(root: Path, reps: int) -> list[str]:
    from evomerge.merge import build

    t0 = time.perf_counter()
    sources = SourceSet.load(
        root / "base", [root / s for s in SOURCES], names=SOURCES, base_name="base", device="cuda"
    )
    load_s = time.perf_counter() - t0
    model = sources.new_model("bfloat16")
    copy = copier(sources)
    n_params = sum(e.numel for e in sources.entries)
    lines = [
        f"Build: {n_params / 1e6:.0f}M parameters, base + 3 sources (bf16 checkpoints, kept "
        f"in bf16 on the GPU, task vectors formed span by span in float32 where a method needs "
        f"them), candidate bf16; "
        f"SourceSet load "
        f"{load_s:.1f} s; GPU memory after load {torch.cuda.memory_allocated() / 2**30:.2f} GiB.",
        "",
        "| method | build (ms) | copy (ms) | build / copy |",
        "|---|---:|---:|---:|",
    ]
    groups = sources.groups(1)
    torch.cuda.reset_peak_memory_stats()
    for m in METHODS:
        r = recipe(m, groups, "base").model_copy(update={"dtype": "bfloat16"})
        build(r, sources, model)  # warm-up (DARE's per-seed table is built here)
        pairs = [
            (seconds(copy, "cuda"), seconds(lambda r=r: build(r, sources, model), "cuda"))
            for _ in range(reps)
        ]
        c = statistics.median(p[0] for p in pairs)
        b = statistics.median(p[1] for p in pairs)
        lines.append(f"| {m} | {b * 1e3:.1f} | {c * 1e3:.1f} | {b / c:.2f} |")
    lines.append(
        f"\nPeak GPU memory while building: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB."
    )
    return lines


def study_part(trials: int, db: Path) -> list[str]:
    build_zoo("test", progress=False)
    cfg = StudyConfig.from_yaml(STUDY.format(trials=trials))
    store = Store(f"sqlite:///{db}")
    store.migrate()
    store.create_study(cfg.name, cfg.to_yaml(), optuna_study_name=cfg.name, budget_trials=trials)
    t0 = time.perf_counter()
    summary = Coordinator(cfg, store).run()
    wall = time.perf_counter() - t0
    rows = store.trials(cfg.name, state="COMPLETE")
    best = store.best(cfg.name, top=1, by="heldout")
    workers = sorted({r.worker for r in rows})
    build_ms = statistics.median(r.build_seconds for r in rows) * 1e3
    eval_s = statistics.median(r.eval_seconds for r in rows)
    return [
        f"Study: {summary.complete} COMPLETE / {summary.failed} FAIL trials of dare_ties over "
        f"3 toy-zoo sources, bf16, 1 actor with num_gpus=1, {wall:.0f} s wall (actor start "
        f"and held-out rescoring included); status {summary.status}.",
        f"Per trial (median): build {build_ms:.0f} ms, eval {eval_s:.2f} s "
        f"(3 generate tasks x 64 prompts). Workers: {', '.join(workers)}.",
        f"Best held-out fitness {best[0].heldout:.3f} (trial {best[0].number}).",
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study-trials", type=int, default=24)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", type=Path, help="checkpoint cache (default: under the temp dir)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: this benchmark measures the GPU worker path")
    root = checkpoints(
        args.dir or Path(tempfile.gettempdir()) / "evomerge-bench-gpu", SHAPES["full"], "bfloat16"
    )
    lines = [
        f"# GPU worker path: {torch.cuda.get_device_name()}, torch {torch.__version__}",
        "",
        *build_part(root, args.reps),
        "",
    ]
    torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        lines += study_part(args.study_trials, Path(tmp) / "gpu.db")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
