"""Real scale: a worker's memory per model parameter in each placement, against the floors.

python -m benchmarks.scale [--size small|mid|full] [--dir DIR] [--trials 5] [--device cuda]

Mistral-shaped bf16 checkpoints in 256 MB shards (base + 3 sources; `full` 308M parameters,
`mid` 149M, `small` 46M) are generated once into DIR (default: the temp dir, outside git).
Each row runs in a fresh process; the first with an empty statistics cache:

- load: `SourceSet.load` (the worker's path); the first load computes the statistics into
  the empty cache, the later ones find them there.
- memory: from /proc/PID/smaps_rollup, per model parameter, after load (with the bf16
  candidate) and after `--trials` builds each of dare_ties and ties. The floor metric is
  Anonymous: memory no other process can share. "private" (Rss - Shared_*) also counts
  clean file pages only this process maps: a lone host worker's mapped checkpoint pages,
  which are the page cache's and turn shared as soon as a second worker maps them.
- floors (no evaluation runs here, so its working set is 0): host <= 1.15 x the candidate's
  bytes; device <= 1.1 x (the sources' checkpoint bytes + the candidate's).
- two workers: two `CandidateWorker`s in Ray actors on this node, host placement, each
  after one trial (build and evaluation); the sum of their anonymous memory against one copy
  of the sources.
- build: median seconds per method, against two references: `stream`, the same path
  without the merge (every span's float32 base and task vectors formed from the
  placement's weights, the base written into the candidate), and `copy`, the copy reference
  of benchmarks/merge_build (plain float32 copies of the bytes a build reads and writes).
- `--device cuda`: the same on the GPU (bf16 candidate and builds there, every time taken
  after a synchronize). The floors are then judged on the device's memory per parameter
  (`torch.cuda.memory_allocated` after load and after the trials, the build's peak from
  `max_memory_allocated` beside them); the two workers are two actors with half a GPU each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import MistralConfig, MistralForCausalLM

SHAPES = {
    "full": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=18),
    "mid": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=6),
    "small": dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=4),
}
MISTRAL = dict(num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
SHARD = 256 << 20
SOURCES = ("s0", "s1", "s2")
METHODS = ("dare_ties", "ties")
HOST_FLOOR, DEVICE_FLOOR = 1.15, 1.1


def write_checkpoints(root: Path, shape: dict) -> Path:
    """Base N(0, 0.02) (unit norms), sources base + N(0, 0.002), bf16, sharded, with the
    zoo's tokenizer (a worker scores zoo tasks with it); once."""
    from evomerge.zoo.tokenizer import build_tokenizer

    if (root / "done").exists():
        return root
    config = MistralConfig(**shape, **MISTRAL, tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MistralForCausalLM(config).state_dict().items()}
    for i, name in enumerate(("base", *SOURCES)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        build_tokenizer().save_pretrained(folder)
        shards: list[dict[str, torch.Tensor]] = [{}]
        for k, s in shapes.items():
            seed = zlib.crc32(k.encode())  # not hash(): that differs from process to process
            base = torch.randn(s, generator=torch.Generator().manual_seed(seed)) * 0.02
            base = torch.ones(s) if k.endswith("norm.weight") else base
            noise = torch.randn(s, generator=torch.Generator().manual_seed(i)) * 0.002 * (i > 0)
            if sum(t.nbytes for t in shards[-1].values()) > SHARD:
                shards.append({})
            shards[-1][k] = (base + noise).to(torch.bfloat16)
        files = [f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors" for j in range(len(shards))]
        for file, state in zip(files, shards, strict=True):
            save_file(state, folder / file)
        weight_map = {k: f for f, state in zip(files, shards, strict=True) for k in state}
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "done").touch()
    return root


def memory(pid: int | str = "self") -> dict[str, int]:
    """A process's smaps_rollup, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        out[key] = int(value.split()[0]) * 1024
    return out


def usage(m: dict[str, int], m0: dict[str, int], n: int) -> dict[str, float]:
    """Bytes per parameter above `m0`: anonymous (the floor's) and private (see above)."""

    def private(x: dict[str, int]) -> int:
        return x["Rss"] - x["Shared_Clean"] - x["Shared_Dirty"]

    return {
        "anonymous": (m["Anonymous"] - m0["Anonymous"]) / n,
        "private": (private(m) - private(m0)) / n,
    }


def streamer(sources, model):
    """The build's path without its maths: form every span's float32 base and task vectors
    from the placement's weights, as a sparsifying build does (a weighted sum forms none), and
    write the base into the candidate."""
    from evomerge.merge.kernels import CHUNK, chunks, span_buffer, steps

    params = dict(model.named_parameters(remove_duplicate=False))

    def run() -> None:
        with torch.no_grad():
            for slot in sources.slots:
                out, size = params[slot.name].view(-1), steps(CHUNK, slot.device)
                into = span_buffer(slot, size)
                for start, stop in chunks(slot.numel, size):
                    out[start:stop].copy_(slot.span(start, stop, into)[0])

    return run


def load(root: Path, placement: str, device: str = "cpu"):
    """The worker's load: the SourceSet of the benchmark's checkpoints."""
    from evomerge.models import SourceSet

    sources = [root / s for s in SOURCES]
    return SourceSet.load(
        root / "base", sources, names=SOURCES, base_name="base", placement=placement, device=device
    )


def seconds(fn, device: str) -> float:
    """Wall seconds of one call, the device's queue drained before and after."""
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def device_usage(n: int) -> dict[str, float]:
    """The GPU's allocated bytes per parameter now and at the peak since the last reset."""
    return {
        "device": torch.cuda.memory_allocated() / n,
        "device_peak": torch.cuda.max_memory_allocated() / n,
    }


def measure(root: Path, placement: str, trials: int, device: str) -> dict:
    """One worker's life in this process: load, candidate, `trials` builds per method."""
    from benchmarks.merge_build import copier, recipe
    from evomerge.merge import build

    gpu = device == "cuda"
    m0 = memory()
    t0 = time.perf_counter()
    sources = load(root, placement, device)
    load_s = time.perf_counter() - t0
    model = sources.new_model("bfloat16")
    n = sum(e.numel for e in sources.entries)
    out = {"placement": placement, "params": n, "load_s": load_s, "device": device}
    out["after_load"] = usage(memory(), m0, n) | (device_usage(n) if gpu else {})
    groups = sources.groups(1)
    builds = {}
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    for method in METHODS if trials else ():
        r = recipe(method, groups, "base").model_copy(update={"dtype": "bfloat16"})
        runs = [seconds(lambda r=r: build(r, sources, model), device) for _ in range(trials)]
        builds[method] = statistics.median(runs)
    # before the references allocate theirs
    out["after_trials"] = usage(memory(), m0, n) | (device_usage(n) if gpu else {})
    if trials:
        r = recipe("task_arithmetic", groups, "base").model_copy(update={"dtype": "bfloat16"})
        runs = [seconds(lambda: build(r, sources, model), device) for _ in range(2)]
        builds["task_arithmetic"] = statistics.median(runs)
        stream, copy = streamer(sources, model), copier(sources)
        out["stream_s"] = statistics.median(seconds(stream, device) for _ in range(2))
        out["copy_s"] = statistics.median(seconds(copy, device) for _ in range(3))
    out["build_s"] = builds
    return out


def child(root: Path, placement: str, trials: int, cache: Path, device: str) -> dict:
    env = os.environ | {"EVOMERGE_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "benchmarks.scale", "--dir", str(root), "--child", placement]
    cmd += ["--trials", str(trials), "--device", device]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


class MeasuredWorker:
    """The service's `CandidateWorker` in a Ray actor, with the actor's memory before it."""

    def __init__(self, spec) -> None:
        from workers.actor import CandidateWorker

        self.before = memory()
        self.worker = CandidateWorker(spec)

    def evaluate(self, recipe_json: str) -> tuple[dict[str, int], int, str | None]:
        """One trial; (memory before the worker, pid, the trial's error)."""
        return self.before, os.getpid(), self.worker.evaluate(recipe_json).error


def pair(root: Path, cache: Path, device: str) -> dict:
    """Two host workers as a study runs them: `CandidateWorker`s in two Ray actors on this
    node, each loaded and after one dare_ties trial (a build and a zoo:add evaluation). Their
    memory above their own start is read while both are alive: they map the same files, so
    the checkpoint pages are the page cache's and neither counts them as its own. On a GPU
    each actor has half of it."""
    gpus = 0.5 if device == "cuda" else 0
    import ray

    from benchmarks.merge_build import recipe
    from evomerge.zoo import build_zoo
    from workers.actor import WorkerSpec

    spec = WorkerSpec(
        base="base",
        base_path=str(root / "base"),
        sources=SOURCES,
        source_paths=tuple(str(root / s) for s in SOURCES),
        tasks=("zoo:add",),
        weights=(1.0,),
        limit=8,
        heldout_limit=8,
        zoo_dir=str(build_zoo("test", progress=False)),
        dtype="bfloat16",
        torch_threads=1,
        placement="host",
        workers=2,
        gpus_per_worker=gpus,
    )
    groups = load(root, "host").groups(1)
    trial = recipe("dare_ties", groups, "base").model_copy(update={"dtype": "bfloat16"})
    # The actors import this checkout and whatever PYTHONPATH already holds (a GPU machine's
    # carried packages: scripts/gpu_check.sh); a PYTHONPATH of the checkout alone hid those.
    path = os.pathsep.join(filter(None, (os.getcwd(), os.environ.get("PYTHONPATH"))))
    env = {"env_vars": {"EVOMERGE_CACHE": str(cache), "PYTHONPATH": path}}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=env, log_to_driver=False)
    try:
        actor = ray.remote(num_cpus=1, num_gpus=gpus)(MeasuredWorker)
        workers = [actor.remote(spec) for _ in range(2)]
        # An actor that cannot start never answers: fail after 10 minutes rather than hang.
        reports = ray.get([w.evaluate.remote(trial.to_json()) for w in workers], timeout=600)
        errors = [e for _, _, e in reports if e]
        if errors:
            raise RuntimeError(f"a worker's trial failed: {errors}")
        n = sum(e.numel for e in load(root, "host").entries)
        now = [usage(memory(pid), before, n) for before, pid, _ in reports]
    finally:
        ray.shutdown()
    return {k: [u[k] for u in now] for k in ("anonymous", "private")}


def report(runs: list[tuple[str, dict]], two: dict | None, trials: int) -> list[str]:
    n = runs[0][1]["params"]
    gpu = runs[0][1]["device"] == "cuda"
    sources = 2 * 4  # bf16 base + 3 sources, bytes a parameter
    floors = {"host": HOST_FLOOR * 2, "device": DEVICE_FLOOR * (sources + 2)}
    judged = "device" if gpu else "anonymous"  # the floor's metric
    where = torch.cuda.get_device_name() if gpu else "the CPU"
    lines = [
        f"{n / 1e6:.0f}M parameters, base + 3 sources, bf16 (2 bytes a parameter a model); "
        f"candidate bf16 on {where}; {trials} builds each of {' and '.join(METHODS)}; torch "
        f"{torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} torch threads, "
        f"load average {os.getloadavg()[0]:.1f} at the end",
        "",
        "| run | load (s) | anonymous B/param after load | after trials | private after load "
        "| after trials |" + (" device B/param after load | after trials | build peak |" * gpu),
        "|---|---:|---:|---:|---:|---:|" + "---:|" * 3 * gpu,
    ]
    verdicts = []
    for label, r in runs:
        a, b = r["after_load"], r["after_trials"]
        after = b if r["build_s"] else {k: float("nan") for k in b}
        row = (
            f"| {label} | {r['load_s']:.2f} | {a['anonymous']:.2f} | {after['anonymous']:.2f} | "
            f"{a['private']:.2f} | {after['private']:.2f} |"
        )
        if gpu:
            row += f" {a['device']:.2f} | {after['device']:.2f} | {after['device_peak']:.2f} |"
        lines.append(row)
        floor = floors[r["placement"]]
        worst = max(a[judged], b[judged])
        verdicts.append(
            f"{label}: {judged} {worst:.2f} B/param against the floor {floor:.2f} "
            f"({'met' if worst <= floor else 'MISSED'})"
        )
    lines += [
        "",
        *verdicts,
        "",
        "| placement | dare_ties (s) | ties (s) | task_arithmetic (s) | stream (s) | copy (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in runs:
        if r["build_s"]:
            b = r["build_s"]
            lines.append(
                f"| {label} | {b['dare_ties']:.3f} | {b['ties']:.3f} | "
                f"{b['task_arithmetic']:.3f} | {r['stream_s']:.3f} | {r['copy_s']:.3f} |"
            )
    lines += ["", f"second load / first: {runs[1][1]['load_s'] / runs[0][1]['load_s']:.3f}"]
    if two is None:
        return [*lines, "two host workers: not measured (--single)"]
    total = sum(two["anonymous"])
    return [
        *lines,
        f"two host workers: anonymous {two['anonymous'][0]:.2f} + {two['anonymous'][1]:.2f} = "
        f"{total:.2f} B/param (private {two['private'][0]:.2f} + {two['private'][1]:.2f}); "
        f"one copy of the sources is {sources} B/param, two would be {2 * sources}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SHAPES), default="full")
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--child", choices=("device", "host"))
    ap.add_argument(
        "--single",
        action="store_true",
        help="skip the two Ray workers: one worker's rows only (a machine without ray, or short"
        " of time: the workers build the toy zoo to evaluate on)",
    )
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here")
    root = args.dir or Path(tempfile.gettempdir()) / f"evomerge-scale-{args.size}"
    if args.child:
        print(json.dumps(measure(root, args.child, args.trials, args.device)))
        return
    write_checkpoints(root, SHAPES[args.size])
    with tempfile.TemporaryDirectory() as cache:
        runs = [
            ("host, first load", child(root, "host", 0, Path(cache), args.device)),
            ("host, second load", child(root, "host", args.trials, Path(cache), args.device)),
            ("device, second load", child(root, "device", args.trials, Path(cache), args.device)),
        ]
        two = None if args.single else pair(root, Path(cache), args.device)
    print(
        f"python -m benchmarks.scale --size {args.size} --trials {args.trials} "
        f"--device {args.device}" + " --single" * args.single
    )
    print(f"{platform.node()}: {platform.platform()}, {os.cpu_count()} CPUs")
    print("\n".join(report(runs, two, args.trials)))
    print(json.dumps({"runs": dict(runs), "two_workers": two}))


if __name__ == "__main__":
    main()
