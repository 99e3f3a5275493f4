"""Where a worker keeps its sources between builds: the two placements.

`device`: the base and every source on the worker's device, in their checkpoint dtype (bf16
stays 2 bytes a parameter). `host`: nothing private at all; the safetensors files are
mapped read-only, so their pages live once in the node's page cache, shared by every
worker of the node, and a build streams them to the device tensor by tensor. Either way a
build never forms a whole tensor's float32 task vectors: a weighted sum forms none, and the
other methods form them span by span as they read them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import warnings
from collections.abc import Iterator, Sequence
from enum import StrEnum
from functools import cached_property
from pathlib import Path

import torch


class Placement(StrEnum):
    """Where a worker keeps its sources (a study's `workers.sources`, `auto` resolved)."""

    DEVICE = "device"
    HOST = "host"


class Weights:
    """The raw tensors (checkpoint dtype, flat) of the base and the sources, per tensor name:
    `stream(names)` yields, for each name in turn, [base, source_1, ..., source_S] on `device`.
    """

    placement: Placement
    device: torch.device

    def stream(self, names: Sequence[str]) -> Iterator[list[torch.Tensor]]:
        raise NotImplementedError


class DeviceWeights(Weights):
    placement = Placement.DEVICE

    def __init__(self, models: Sequence, names: Sequence[str], device: torch.device) -> None:
        """`models`: the Checkpoints, base first; every tensor is read once, to `device`."""
        self.device = device
        self._tensors = {n: [ck.read(n).reshape(-1).to(device) for ck in models] for n in names}

    def stream(self, names: Sequence[str]) -> Iterator[list[torch.Tensor]]:
        for n in names:
            yield self._tensors[n]


class HostWeights(Weights):
    placement = Placement.HOST

    def __init__(self, models: Sequence, names: Sequence[str], device: torch.device) -> None:
        """`models`: the Checkpoints, base first; their files are mapped, nothing is read."""
        self.device = device
        maps: dict[Path, mmap.mmap] = {}
        self._views: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for ck in models:
            for n in names:
                file, start, stop, dtype = ck.locate(n)
                if file not in maps:
                    with open(file, "rb") as f:
                        maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._views[n].append(_view(maps[file], start, stop, dtype))

    def stream(self, names: Sequence[str]) -> Iterator[list[torch.Tensor]]:
        if self.device.type != "cuda":
            for n in names:
                yield self._views[n]
            return
        yield from self._cuda_stream(names)

    @cached_property
    def _side(self) -> torch.cuda.Stream:
        """The one stream every build copies on. The caching allocator reuses a freed block
        only on the stream it was allocated on: a new pooled stream per build would leave
        each build's staged tensors cached for a stream the next build does not use, and
        the worker's reserved memory would grow build after build."""
        return torch.cuda.Stream(self.device)

    def _cuda_stream(self, names: Sequence[str]) -> Iterator[list[torch.Tensor]]:
        """Copy tensor i + 1 on a side stream while the device merges tensor i: each source
        is staged in pinned memory (torch's caching host allocator reuses the buffers).

        A build never waits for the device, so the host would run ahead, staging tensor
        after tensor into new memory; before staging i + 1 it waits until the merge of
        i - 1 is done, which keeps two tensors on the device and the device busy.
        """
        side = self._side
        main = torch.cuda.current_stream(self.device)

        def start(name: str) -> tuple[list[torch.Tensor], torch.cuda.Event]:
            with torch.cuda.stream(side):
                moved = [
                    v.pin_memory().to(self.device, non_blocking=True) for v in self._views[name]
                ]
                done = torch.cuda.Event()
                done.record(side)
            return moved, done

        pending = start(names[0]) if names else None
        merged = None
        for i in range(len(names)):
            moved, done = pending
            main.wait_event(done)
            for t in moved:
                t.record_stream(main)
            yield moved
            previous, merged = merged, torch.cuda.Event()
            merged.record(main)
            if previous is not None:
                previous.synchronize()
            if i + 1 < len(names):
                pending = start(names[i + 1])


def _view(buf: mmap.mmap, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor over bytes start..stop of a read-only mapping (no copy)."""
    if stop == start:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():  # the mapping is read-only and nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=torch.uint8, count=stop - start, offset=start).view(
            dtype
        )


def _libc_trim():
    """glibc's `malloc_trim`, or None where the C library is not glibc."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _libc_trim()


def release_heap() -> None:
    """Give the pages of freed temporaries back to the operating system.

    glibc serves an allocation above its mmap threshold with its own mapping and unmaps it on
    free, but each such free raises the threshold (up to 32 MiB), so the next tensors of a
    build or a statistics pass come from the heap, and glibc keeps freed heap pages: after a
    few builds a worker held 1-2 bytes a parameter of dead float32 temporaries. A build and a
    load end here, so a worker's memory between trials is what it keeps, not what it used.
    `malloc_trim(0)` releases every free page of every arena (a few ms); a fixed
    M_MMAP_THRESHOLD would instead unmap every chunk buffer of the fused passes, each time.
    """
    if _TRIM is not None:
        _TRIM(0)


def open_weights(
    placement: str, models: Sequence, names: Sequence[str], device: torch.device
) -> Weights:
    kind = {Placement.DEVICE: DeviceWeights, Placement.HOST: HostWeights}
    return kind[Placement(placement)](models, names, device)
