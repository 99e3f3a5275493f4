"""Parameter-space build speed: evomerge's in-place build per method, against two references.

python -m benchmarks.merge_build [--small] [--threads N] [--reps 3] [--write FILE.md]

On a randomly initialised Llama-shaped checkpoint (271M parameters; `--small`: 7M) with a base
and 3 sources, all float32:

- build: `evomerge.merge.build(recipe, sources, into=model)`, per-layer parameters
  (granularity 1), median of `--reps` runs after one warm-up.
- copy: the bandwidth bound. A build reads R bytes (the base and 3 task vectors) and writes
  W (the candidate); the copy moves the same R + W bytes with plain `Tensor.copy_`, tensor by
  tensor, timed right before each build run so both see the same machine.
- mergekit: `mergekit.merge_methods.merge_state_dicts` on the same float32 base and sources,
  in memory, with the same parameters (the faster of two runs).
- memory: peak RSS above the RSS before loading (Linux VmHWM, reset per phase), while
  loading, then while building each floor method once, then every method once; against
  base + task vectors + one candidate.
Floors: linear and task_arithmetic within 2x of the copy; ties and dare_ties at least 5x
faster than mergekit; floor builds' peak memory within 110% of the resident bytes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
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
NOTES = [
    "",
    "Notes: weighted sums (linear, task_arithmetic, slerp, model_stock) sum the models' own "
    "weights, forming no task vector (SLERP and model stock take their coefficients from "
    "per-tensor Gram statistics). TIES-style "
    "top-k thresholds come from per-tensor magnitude rank grids (at most one scan, no sort). "
    "DARE's rescale reads a per-seed table of kept L1 by random draw, built by the first candidate "
    "of a seed (the warm-up here) and reused by the rest of a study. DELLA ranks every row "
    "and SCE selects by variance across sources per candidate, as mergekit does: no floor.",
]
MERGEKIT_DEFAULT = ("linear", "task_arithmetic", "ties", "dare_ties")
FLOORS = {"linear": "copy", "task_arithmetic": "copy", "ties": "mergekit", "dare_ties": "mergekit"}


def _write_checkpoints(root: Path, shape: dict, dtype: str) -> None:
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
        state = {
            k: (v + torch.randn(v.shape, generator=gen) * noise).to(getattr(torch, dtype))
            for k, v in base.items()
        }
        save_file(state, folder / "model.safetensors")
        del state
    (root / "done").touch()


def checkpoints(root: Path, shape: dict, dtype: str = "float32") -> Path:
    """Write the checkpoints once (in a child process, so their memory is not ours)."""
    if not (root / "done").exists():
        proc = mp.get_context("spawn").Process(target=_write_checkpoints, args=(root, shape, dtype))
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


def timed(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def median(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def copier(sources: SourceSet):
    """Plain copies moving the bytes a build reads and writes, tensor by tensor: per tensor,
    (S + 2) / 2 float32 copies of it (S task vectors and the base read, the candidate
    written, each byte counted once)."""
    sizes = [(len(sources.names) + 2) * e.numel // 2 for e in sources.entries]
    src = torch.ones(max(sizes), device=sources.device)
    scratch = torch.empty_like(src)

    def run() -> None:
        for n in sizes:
            scratch[:n].copy_(src[:n])

    return run


def mergekit_time(method: str, root: Path, reps: int) -> tuple[float, float]:
    """The fastest of `reps` in-memory mergekit merges (in mergekit's favour)."""
    from mergekit.merge_methods import merge_state_dicts

    models = {n: load_file(root / n / "model.safetensors") for n in ("base", *SOURCES)}
    params = {k: (list(v) if len(v) > 1 else v[0]) for k, v in PARAMS[method].items()}
    if method == "linear":
        models.pop("base")
    elif method == "slerp":
        models = {"base": models["base"], SOURCES[0]: models[SOURCES[0]]}
    base = None if method == "linear" else "base"
    runs = [
        timed(
            lambda: merge_state_dicts(
                models, method, parameters=params, base=base, dtype=torch.float32
            )
        )
        for _ in range(reps)
    ]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def peak_rss() -> int:
    """Peak resident bytes since the last `reset_peak()` (Linux VmHWM)."""
    status = Path("/proc/self/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1]) * 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def time_builds(sources: SourceSet, model, methods, reps: int) -> tuple[dict, dict]:
    """Per method, the median (wall, cpu) of its builds and of copies timed alternately
    with them (same conditions for both)."""
    groups = sources.groups(1)
    copy = copier(sources)
    builds, copies = {}, {}
    for m in methods:
        r = recipe(m, groups, "base")

        def run(r=r) -> None:
            build(r, sources, model)

        run()
        pairs = [(timed(copy), timed(run)) for _ in range(reps)]
        copies[m], builds[m] = median([p[0] for p in pairs]), median([p[1] for p in pairs])
    return builds, copies


def peak_builds(sources: SourceSet, model, methods, rss0: int) -> dict[str, int]:
    """Peak RSS above `rss0` while building each method once: the floor methods, then all."""
    groups = sources.groups(1)
    peaks = {}
    reset_peak()
    for m in sorted(methods, key=lambda m: m not in FLOORS):
        build(recipe(m, groups, "base"), sources, model)
        peaks["floor builds" if m in FLOORS else "all builds"] = peak_rss() - rss0
    return peaks


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

    rss0 = psutil.Process().memory_info().rss
    reset_peak()
    t0 = time.perf_counter()
    sources = SourceSet.load(
        root / "base", [root / s for s in SOURCES], names=SOURCES, base_name="base"
    )
    load_s = time.perf_counter() - t0
    model = sources.new_model("float32")
    names = [e.name for e in sources.entries]
    mem = {"load": peak_rss() - rss0}
    resident = sum(t.nbytes for ts in sources.weights.stream(names) for t in ts) + sum(
        p.nbytes for p in model.parameters()
    )
    ours, copies = time_builds(sources, model, args.methods, args.reps)
    mem |= peak_builds(sources, model, args.methods, rss0)
    n_params = sum(e.numel for e in sources.entries)
    del sources, model
    theirs = {m: mergekit_time(m, root, 2) for m in args.mergekit if m in args.methods}

    lines = report(size, n_params, load_s, copies, ours, theirs, mem, resident, args.reps)
    print("\n".join(lines))
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text("\n".join(lines) + "\n")


def _pair(a: float, b: float, fmt: str = ".0f") -> str:
    return f"{a:{fmt}} / {b:{fmt}}"


def report(size, n_params, load_s, copies, ours, theirs, mem, resident, reps) -> list[str]:
    cmd = "python -m benchmarks.merge_build" + (" --small" if size == "small" else "")
    cmd += f" --threads {torch.get_num_threads()}"
    lines = [
        "# Merge build benchmark",
        "",
        f"`{cmd}`: Llama-shaped, {n_params / 1e6:.0f}M parameters, base + 3 sources, "
        f"float32; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{platform.machine()}, {psutil.cpu_count()} CPUs, load average "
        f"{psutil.getloadavg()[0]:.1f} at the end. Median of {reps} builds after a warm-up, "
        "each after a copy of the bytes the build reads and writes (the bandwidth bound; "
        "`/ copy` compares each build with its own copies); mergekit: the faster of two "
        "`merge_state_dicts` runs. Times are wall / process-CPU; floors are judged on CPU "
        "time, which other tenants of a shared machine do not inflate.",
        "",
        f"SourceSet load (checks, task vectors, statistics): {load_s:.1f} s. Copy: "
        f"{_pair(*(statistics.median(c[i] for c in copies.values()) * 1e3 for i in (0, 1)))}"
        " ms (median).",
        "",
        "| method | build (ms) | build / copy | mergekit (ms) | mergekit / build | floor |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for m, (wall, cpu) in ours.items():
        mk, copy = theirs.get(m), copies[m]
        floor = ""
        if FLOORS.get(m) == "copy":
            floor = ("ok" if cpu <= 2 * copy[1] else "MISSED") + " (<= 2x copy)"
        elif FLOORS.get(m) == "mergekit" and mk is not None:
            floor = ("ok" if mk[1] >= 5 * cpu else "MISSED") + " (>= 5x faster)"
        mk_ms = "" if mk is None else _pair(mk[0] * 1e3, mk[1] * 1e3)
        mk_ratio = "" if mk is None else _pair(mk[0] / wall, mk[1] / cpu, ".1f")
        lines.append(
            f"| {m} | {_pair(wall * 1e3, cpu * 1e3)} | "
            f"{_pair(wall / copy[0], cpu / copy[1], '.2f')} | {mk_ms} | {mk_ratio} | {floor} |"
        )
    lines += [
        "",
        f"Memory: {resident / 2**30:.2f} GiB resident by design (base and sources in "
        "their checkpoint dtype + one candidate). Peak RSS above the start of the run:",
    ]
    for phase, peak in mem.items():
        verdict = ""
        if phase == "floor builds":
            verdict = f" — {'ok' if peak <= 1.1 * resident else 'MISSED'} (<= 1.10x)"
        lines.append(f"- {phase}: {peak / 2**30:.2f} GiB ({peak / resident:.2f}x){verdict}")
    return lines + NOTES


if __name__ == "__main__":
    main()
