"""The on-disk cache of a SourceSet's statistics, keyed by the checkpoints' content.

Computing the statistics reads every weight of every source once (about a minute per
billion parameters on a CPU); with the cache, the second worker of a node, the next run and
a resumed run only map the files. The cache lives beside the toy zoo's, under
`$EVOMERGE_CACHE` or the user cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from evomerge.cachedir import cache_root
from evomerge.tensor_stats import GRID, TensorStats

FORMAT = 1  # bump when the statistics or their layout change
SAMPLE = 4096  # bytes read from the middle of every tensor for the key


def cache_dir() -> Path:
    return cache_root() / "stats"


def content_key(files: Sequence[Sequence[Path]], device: torch.device) -> str:
    """A key for the statistics of the models whose safetensors files are `files` (base first).

    Not a full sha256: hashing four 7B checkpoints reads 58 GB, which is the cost the cache
    is there to avoid. Instead the key hashes every file's size and header (each tensor's
    name, dtype, shape and offsets) and SAMPLE bytes from the middle of every tensor. Two
    fine-tunes of one base differ almost everywhere, so they differ in those samples; a file
    that only differs in bytes no sample reads would share a key, which is the price of a
    load that costs milliseconds. Paths are left out (a copy on another node hits the
    cache); the torch version and device type are in, since the statistics
    are computed there and builds read them bit for bit.
    """
    # "torch.float32": task vectors' dtype, once a choice; kept so that existing caches (and
    # fusion's distributions, keyed on this) stay valid
    h = hashlib.sha256(
        f"{FORMAT}\0{GRID}\0{torch.__version__}\0torch.float32\0{device.type}".encode()
    )
    for model in files:
        h.update(b"\1model")
        for file in model:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = f.read(size)
                h.update(os.fstat(f.fileno()).st_size.to_bytes(8, "little") + header)
                for start, stop in _spans(header):
                    f.seek(8 + size + max(start, (start + stop - SAMPLE) // 2))
                    h.update(f.read(min(SAMPLE, stop - start)))
    return h.hexdigest()


def _spans(header: bytes) -> list[tuple[int, int]]:
    """Each tensor's [start, stop) in the data section, in file order."""
    table = json.loads(header)
    table.pop("__metadata__", None)
    return sorted(tuple(e["data_offsets"]) for e in table.values())


def load(key: str, names: Sequence[str]) -> dict[str, TensorStats] | None:
    """The cached statistics of tensors `names`, or None when there are none for `key`.

    They stay on the host, whatever the workers' device, mapped from the file: page cache,
    shared by the workers of a node. What a build decides from them (coefficients, top-k
    brackets) it decides on the host, without waiting for the device.
    """
    path = cache_dir() / f"{key}.safetensors"
    if not path.is_file():
        return None
    flat = load_file(path)
    try:
        return {
            n: TensorStats.from_tensors({f: flat[f"{n}/{f}"] for f in TensorStats.FIELDS})
            for n in names
        }
    except KeyError:  # a file of another set of tensors under this key: recompute
        return None


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata=None) -> bool:
    """Write `path` atomically (workers of one node may write the same file at once); False,
    with a warning, where the cache cannot be written: a cache is best-effort, never a
    failed run."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(
            f"cannot write the statistics cache ({path.parent}: {e}); this worker keeps what "
            "it computed in its own memory, and every worker and run computes it again",
            stacklevel=3,
        )
        return False
    return True


def save(key: str, stats: dict[str, TensorStats]) -> bool:
    """Save the statistics under `key`; False where the cache cannot be written (`_write`)."""
    flat = {
        f"{n}/{f}": t.contiguous().cpu() for n, s in stats.items() for f, t in s.tensors().items()
    }
    return _write(cache_dir() / f"{key}.safetensors", flat)


class Derived:
    """What the merge engine derives from one tensor on first use and keeps between builds
    (DARE's kept-L1-by-draw tables of a seed): each value is a (tag, tensor) pair, written
    to a file beside the statistics and kept mapped from it. Page cache, then: shared by the
    workers of a node and by the next run, where a dict would hold every table in every
    worker's own memory (S x 256 KiB a tensor; 0.4 bytes a parameter at 300M).
    """

    def __init__(self, key: str, tensor: str, device: torch.device) -> None:
        self._folder = cache_dir() / key
        self._tensor, self._device = tensor, device
        self._held: dict = {}

    def _path(self, name) -> Path:
        digest = hashlib.sha256(f"{self._tensor}\0{name!r}".encode()).hexdigest()[:32]
        return self._folder / f"{digest}.safetensors"

    def get(self, name, default=None):
        """The (tag, tensor) kept under `name`, from memory or its file; else `default`."""
        if name not in self._held:
            path = self._path(name)
            if not path.is_file():
                return default
            with safe_open(path, "pt") as f:
                tag = tuple(json.loads(f.metadata()["tag"]))
            self._held[name] = (tag, load_file(path, device=str(self._device))["value"])
        return self._held[name]

    def __getitem__(self, name):
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __setitem__(self, name, value: tuple[tuple, torch.Tensor]) -> None:
        """Write (`_write`), then map; kept in this worker's memory where it cannot be."""
        tag, tensor = value
        value_file = {"value": tensor.contiguous().cpu()}
        if not _write(self._path(name), value_file, metadata={"tag": json.dumps(tag)}):
            self._held[name] = value
            return
        self._held.pop(name, None)
        self.get(name)
