"""Parameter-space build speed: evomerge's in-place build per method, against two references.

python -m benchmarks.merge_build [--small] [--threads N] [--reps 3] [--write FILE.md]

On a randomly initialised Llama-shaped checkpoint (271M parameters; `--small`: 7M) with a base
and 3 sources, all float32:

- build: `evomerge.merge.build(recipe, sources, into=model)`, median of `--reps` runs after one
  warm-up, per-layer parameters (granularity 1).
- copy: the bandwidth bound. A build reads R bytes (the base and 3 task vectors) and writes
  W (the candidate); the copy moves the same R + W bytes with plain `Tensor.copy_`, tensor by
  tensor, measured in the same run.
- mergekit: `mergekit.merge_methods.merge_state_dicts` on the same float32 base and sources,
  in memory, with the same parameters (one run: it is slow).
- memory: peak RSS of loading and building, less the RSS before loading, against base + task
  vectors + one candidate.
Floors: linear and task_arithmetic within 2x of the copy; ties and dare_ties at least 5x
faster than mergekit; peak memory within 110% of the resident bytes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.merge import METHODS, build
from evomerge.models import SourceSet
from evomerge.recipe import Recipe

SHAPES = {
    "full": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
    ),
    "small": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=8000,
    ),
}
SOURCES = ("s0", "s1", "s2")
WEIGHTS = (0.5, 0.3, 0.4)
DENSITIES = (0.5, 0.6, 0.7)
PARAMS = {
    "linear": {"weight": WEIGHTS},
    "task_arithmetic": {"weight": WEIGHTS},
    "ties": {"weight": WEIGHTS, "density": DENSITIES},
    "dare_ties": {"weight": WEIGHTS, "density": DENSITIES},
    "dare_linear": {"weight": WEIGHTS, "density": DENSITIES},
    "breadcrumbs_ties": {"weight": WEIGHTS, "density": DENSITIES, "gamma": (0.01,) * 3},
    "della": {"weight": WEIGHTS, "density": DENSITIES, "epsilon": (0.1,) * 3},
    "model_stock": {},
    "sce": {"select_topk": (0.5,)},
    "slerp": {"t": (0.4,)},
}
MERGEKIT_DEFAULT = ("linear", "task_arithmetic", "ties", "dare_ties")
FLOORS = {"linear": "copy", "task_arithmetic": "copy", "ties": "mergekit", "dare_ties": "mergekit"}


def _write_checkpoints(root: Path, shape: dict) -> None:
    """Base: N(0, 0.02) weights, unit norms; sources: base + N(0, 0.002) noise (seeded)."""
    config = LlamaConfig(**shape, tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    base = {
        k: torch.ones(s) if k.endswith("norm.weight") else torch.randn(s, generator=gen) * 0.02
        for k, s in shapes.items()
    }
    for name, noise in (("base", 0.0), *((s, 0.002) for s in SOURCES)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        state = {k: v + torch.randn(v.shape, generator=gen) * noise for k, v in base.items()}
        save_file(state, folder / "model.safetensors")
        del state
    (root / "done").touch()


def checkpoints(root: Path, shape: dict) -> Path:
    """Write the checkpoints once (in a child process, so their memory is not ours)."""
    if not (root / "done").exists():
        proc = mp.get_context("spawn").Process(target=_write_checkpoints, args=(root, shape))
        proc.start()
        proc.join()
        if proc.exitcode:
            sys.exit(f"writing checkpoints failed (exit {proc.exitcode})")
    return root


def recipe(method: str, groups: tuple[str, ...], base: str) -> Recipe:
    params = {k: (tuple(v),) * len(groups) for k, v in PARAMS[method].items()}
    if method == "slerp":
        return Recipe(method=method, base=base, sources=SOURCES[:1], groups=groups, params=params)
    return Recipe(
        method=method,
        base=None if method == "linear" else base,
        sources=SOURCES,
        groups=groups,
        params=params,
        seed=1,
    )


def median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_reference(sources: SourceSet, reps: int) -> float:
    """Plain copies moving the bytes a build reads and writes, tensor by tensor."""
    per_slot = [(s.tv.view(-1), (s.tv.shape[0] + 2) * s.numel // 2) for s in sources.slots]
    scratch = torch.empty(max(n for _, n in per_slot))

    def run() -> None:
        for src, n in per_slot:
            scratch[:n].copy_(src[:n])

    return median_time(run, reps)


def mergekit_time(method: str, root: Path) -> float:
    from mergekit.merge_methods import merge_state_dicts

    models = {n: load_file(root / n / "model.safetensors") for n in ("base", *SOURCES)}
    params = {k: (list(v) if len(v) > 1 else v[0]) for k, v in PARAMS[method].items()}
    if method == "linear":
        models.pop("base")
    elif method == "slerp":
        models = {"base": models["base"], SOURCES[0]: models[SOURCES[0]]}
    base = None if method == "linear" else "base"
    t0 = time.perf_counter()
    merged = merge_state_dicts(models, method, parameters=params, base=base, dtype=torch.float32)
    elapsed = time.perf_counter() - t0
    del merged, models
    return elapsed


def time_builds(sources: SourceSet, model, methods: list[str], reps: int) -> dict[str, float]:
    groups = sources.groups(1)
    return {
        m: median_time(lambda m=m: build(recipe(m, groups, "base"), sources, model), reps)
        for m in methods
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="7M parameters, a quick run")
    ap.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS))
    ap.add_argument(
        "--mergekit",
        nargs="*",
        default=list(MERGEKIT_DEFAULT),
        help="methods also timed with mergekit (slow)",
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--dir", type=Path, help="checkpoint cache (default: under the temp dir)")
    ap.add_argument("--write", type=Path, help="write the results as markdown to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = "small" if args.small else "full"
    root = checkpoints(
        args.dir or Path(tempfile.gettempdir()) / f"evomerge-bench-{size}", SHAPES[size]
    )

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    sources = SourceSet.load(
        root / "base", [root / s for s in SOURCES], names=SOURCES, base_name="base"
    )
    load_s = time.perf_counter() - t0
    model = sources.new_model("float32")
    n_params = sum(s.numel for s in sources.slots)
    resident = sum(s.base.nbytes + s.tv.nbytes for s in sources.slots) + sum(
        p.nbytes for p in model.parameters()
    )
    ours = time_builds(sources, model, args.methods, args.reps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    copy_s = copy_reference(sources, args.reps)
    del sources, model
    theirs = {m: mergekit_time(m, root) for m in args.mergekit if m in args.methods}

    lines = report(size, n_params, load_s, copy_s, ours, theirs, peak, resident, args.reps)
    print("\n".join(lines))
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text("\n".join(lines) + "\n")


def report(size, n_params, load_s, copy_s, ours, theirs, peak, resident, reps) -> list[str]:
    cmd = "python -m benchmarks.merge_build" + (" --small" if size == "small" else "")
    cmd += f" --threads {torch.get_num_threads()}"
    lines = [
        "# Merge build benchmark",
        "",
        f"`{cmd}` — Llama-shaped, {n_params / 1e6:.0f}M parameters, base + 3 sources, "
        f"float32; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs. "
        f"Median of {reps} builds after a warm-up; mergekit: one `merge_state_dicts` run.",
        "",
        f"SourceSet load (checks, task vectors, statistics): {load_s:.1f} s. "
        f"Copy of the bytes a build reads and writes: {copy_s * 1e3:.0f} ms.",
        "",
        "| method | build (ms) | / copy | mergekit (ms) | mergekit / build | floor |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for m, t in ours.items():
        mk = theirs.get(m)
        floor = ""
        if FLOORS.get(m) == "copy":
            floor = ("ok" if t <= 2 * copy_s else "MISSED") + " (<= 2x copy)"
        elif FLOORS.get(m) == "mergekit" and mk is not None:
            floor = ("ok" if mk >= 5 * t else "MISSED") + " (>= 5x faster)"
        lines.append(
            f"| {m} | {t * 1e3:.0f} | {t / copy_s:.2f} | "
            f"{'' if mk is None else f'{mk * 1e3:.0f}'} | "
            f"{'' if mk is None else f'{mk / t:.1f}'} | {floor} |"
        )
    ok = peak <= 1.1 * resident
    lines += [
        "",
        f"Peak memory of load + builds: {peak / 2**30:.2f} GiB above the start, for "
        f"{resident / 2**30:.2f} GiB resident (base + task vectors + one candidate): "
        f"{peak / resident:.2f}x — {'ok' if ok else 'MISSED'} (<= 1.10x).",
    ]
    return lines


if __name__ == "__main__":
    main()
