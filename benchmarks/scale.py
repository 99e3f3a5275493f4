"""Real scale: a worker's private memory per model parameter in each placement.

python -m benchmarks.scale [--small] [--dir DIR] [--trials 5]

Mistral-shaped bf16 checkpoints in 256 MB shards (base + 3 sources; 308M parameters,
`--small`: 46M) are generated once into DIR (default: the temp dir, outside git). Each
measurement runs in a fresh process with a fresh statistics cache where it says "first":

- load: `SourceSet.load` (the worker's path) in each placement; the first load computes the
  statistics into an empty cache, the second finds them there.
- memory: from /proc/self/smaps_rollup, private = Rss - Shared_Clean - Shared_Dirty, and
  Anonymous (memory no other process can share), per model parameter, after load and after
  `--trials` builds each of dare_ties and ties into a resident bf16 candidate. Mapped file
  pages that only this process maps count as private clean; they are the page cache's and a
  second worker mapping the same files turns them into shared.
- build: median seconds of a dare_ties and a ties build, against the copy reference of
  benchmarks/merge_build (plain copies of the bytes a build reads and writes, float32).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import MistralConfig, MistralForCausalLM

SHAPES = {
    "full": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=18),
    "small": dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=4),
}
MISTRAL = dict(num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
SHARD = 256 << 20
SOURCES = ("s0", "s1", "s2")


def write_checkpoints(root: Path, shape: dict) -> Path:
    """Base N(0, 0.02) (unit norms), sources base + N(0, 0.002), bf16, sharded; once."""
    if (root / "done").exists():
        return root
    config = MistralConfig(**shape, **MISTRAL, tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MistralForCausalLM(config).state_dict().items()}
    for i, name in enumerate(("base", *SOURCES)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        shards: list[dict[str, torch.Tensor]] = [{}]
        for k, s in shapes.items():
            base = torch.randn(s, generator=torch.Generator().manual_seed(hash(k) % 2**31)) * 0.02
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


def memory() -> dict[str, int]:
    """This process's smaps_rollup, in bytes."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        out[key] = int(value.split()[0]) * 1024
    return out


def private(m: dict[str, int]) -> int:
    return m["Rss"] - m["Shared_Clean"] - m["Shared_Dirty"]


def measure(root: Path, placement: str, trials: int) -> dict:
    """One worker's life in this process: load, candidate, `trials` builds per method."""
    from benchmarks.merge_build import copier, median, recipe, timed
    from evomerge.merge import build
    from evomerge.models import SourceSet

    m0 = memory()
    t0 = time.perf_counter()
    sources = SourceSet.load(
        root / "base",
        [root / s for s in SOURCES],
        names=SOURCES,
        base_name="base",
        placement=placement,
    )
    load_s = time.perf_counter() - t0
    model = sources.new_model("bfloat16")
    n = sum(e.numel for e in sources.entries)
    after_load = memory()
    groups = sources.groups(1)
    builds = {}
    for method in ("dare_ties", "ties"):
        r = recipe(method, groups, "base").model_copy(update={"dtype": "bfloat16"})
        builds[method] = median(
            [timed(lambda r=r: build(r, sources, model)) for _ in range(trials)]
        )[0]
    copy = copier(sources)
    copy_s = median([timed(copy) for _ in range(3)])[0]
    after = memory()

    def per_param(m: dict[str, int]) -> dict[str, float]:
        return {
            "private": (private(m) - private(m0)) / n,
            "anonymous": (m["Anonymous"] - m0["Anonymous"]) / n,
        }

    return {
        "placement": placement,
        "params": n,
        "load_s": load_s,
        "after_load": per_param(after_load),
        "after_trials": per_param(after),
        "build_s": builds,
        "copy_s": copy_s,
    }


def child(root: Path, placement: str, trials: int, cache: Path) -> dict:
    env = os.environ | {"EVOMERGE_CACHE": str(cache)}
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.scale",
        "--dir",
        str(root),
        "--child",
        placement,
        "--trials",
        str(trials),
    ]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--child", choices=("device", "host"))
    args = ap.parse_args()
    size = "small" if args.small else "full"
    root = args.dir or Path(tempfile.gettempdir()) / f"evomerge-scale-{size}"
    if args.child:
        print(json.dumps(measure(root, args.child, args.trials)))
        return
    write_checkpoints(root, SHAPES[size])
    with tempfile.TemporaryDirectory() as cache:
        runs = [
            ("host, first load", child(root, "host", args.trials, Path(cache))),
            ("host, second load", child(root, "host", args.trials, Path(cache))),
            ("device, second load", child(root, "device", args.trials, Path(cache))),
        ]
    n = runs[0][1]["params"]
    print(
        f"{n / 1e6:.0f}M parameters, base + 3 sources, bf16 (2 bytes a parameter a model); "
        f"candidate bf16; {torch.get_num_threads()} torch threads"
    )
    print(
        "| run | load (s) | private B/param after load | after trials | anonymous after "
        "trials | dare_ties build (s) | ties build (s) | copy (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in runs:
        b = r["build_s"]
        print(
            f"| {label} | {r['load_s']:.1f} | {r['after_load']['private']:.2f} | "
            f"{r['after_trials']['private']:.2f} | {r['after_trials']['anonymous']:.2f} | "
            f"{b['dare_ties']:.2f} | {b['ties']:.2f} | {r['copy_s']:.2f} |"
        )
    print(f"second load / first: {runs[1][1]['load_s'] / runs[0][1]['load_s']:.3f}")
    print(json.dumps({label: r for label, r in runs}))


if __name__ == "__main__":
    main()
