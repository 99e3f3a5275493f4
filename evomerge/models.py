"""Checkpoints and the `SourceSet` the merge engine builds from.

A `SourceSet` is loaded once per worker: the base model and the sources, kept where its
placement says (`evomerge.placement`: on the device in their checkpoint dtype, or mapped
from the files), plus per-tensor statistics (L1 norms, Gram matrices, magnitude rank grids)
that make the per-candidate work cheap, cached on disk by content. A build reaches the
tensors one at a time as `TensorSlot`s: float32 base and stacked task vectors (source -
base), formed for that tensor only. Which tensor belongs to which layer group the model itself
says (`evomerge.layout`): no per-architecture table.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.initialization import no_init_weights

from evomerge import stats_cache
from evomerge.layout import SHAPE_KEYS, Layout
from evomerge.placement import Placement, Weights, open_weights, release_heap
from evomerge.recipe import EMBED, LM_HEAD, NORM, layer_group_names
from evomerge.tensor_stats import MagnitudeGrid, TensorStats

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def has_tokenizer(folder: Path) -> bool:
    return any(
        (folder / n).is_file()
        for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A local Hugging Face checkpoint folder: its config and where each tensor lives."""

    path: Path
    config: PretrainedConfig
    files: dict[str, Path]  # tensor name -> safetensors file

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"model folder not found: {p}")
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p}: no config.json")
        index = p / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: p / f for name, f in weight_map.items()}
        elif (p / "model.safetensors").is_file():
            files = dict.fromkeys(_header(p / "model.safetensors")[1], p / "model.safetensors")
        else:
            raise FileNotFoundError(f"{p}: no model.safetensors or model.safetensors.index.json")
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise FileNotFoundError(f"{p}: shard files missing: {missing}")
        return cls(p, AutoConfig.from_pretrained(p), files)

    @cached_property
    def _headers(self) -> dict[Path, tuple[int, dict]]:
        return {file: _header(file) for file in sorted(set(self.files.values()))}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            name: tuple(entry["shape"])
            for _, table in self._headers.values()
            for name, entry in table.items()
        }

    def read(self, name: str) -> torch.Tensor:
        offset, table = self._headers[self.files[name]]
        return _read(self.files[name], offset, table[name])

    def locate(self, name: str) -> tuple[Path, int, int, torch.dtype]:
        """The file of tensor `name`, its byte range there and its dtype."""
        offset, table = self._headers[self.files[name]]
        entry = table[name]
        start, stop = entry["data_offsets"]
        return self.files[name], offset + start, offset + stop, _dtype(self.files[name], entry)

    def nbytes(self) -> int:
        """Bytes of tensor data (what the checkpoint holds in memory, in its dtype)."""
        return sum(
            e["data_offsets"][1] - e["data_offsets"][0]
            for _, table in self._headers.values()
            for e in table.values()
        )


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _header(file: Path) -> tuple[int, dict]:
    """The data offset and tensor table of a safetensors file."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        table = json.loads(f.read(size))
    table.pop("__metadata__", None)
    return 8 + size, table


def _dtype(file: Path, entry: dict) -> torch.dtype:
    dtype = _ST_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"{file}: unsupported safetensors dtype {entry['dtype']}")
    return dtype


def _read(file: Path, offset: int, entry: dict) -> torch.Tensor:
    """One tensor read with plain file reads (no mmap: file pages stay out of our RSS)."""
    dtype = _dtype(file, entry)
    start, stop = entry["data_offsets"]
    raw = torch.empty(stop - start, dtype=torch.uint8)
    with open(file, "rb") as f:
        f.seek(offset + start)
        if f.readinto(raw.numpy()) != stop - start:
            raise ValueError(f"{file}: truncated tensor data")
    return raw.view(dtype).reshape(entry["shape"])


@dataclass(frozen=True, eq=False)
class TensorSlot:
    """One tensor as the merge engine sees it: its raw weights and statistics.

    Its base and task vectors are formed span by span as a pass reads them (`span`, `piece`),
    never whole: a DARE pass reads each weight once and writes only the candidate, a TIES
    scan forms one source's span at a time, and a weighted sum forms none (it sums `raw`).
    `gram` holds the float64 dot products of (base, tv_1, ..., tv_S); `grid` the magnitude
    order statistics of each task vector; `cache` what the merge engine derives on first use
    (tables of a random stream, say), kept in files beside the statistics.
    """

    name: str
    shape: torch.Size
    part: str | int
    raw: list[torch.Tensor]  # flat [base, source_1, ...] as the placement holds them
    l1: torch.Tensor  # float64 [S]
    gram: torch.Tensor  # float64 [S + 1, S + 1]
    grid: MagnitudeGrid
    cache: stats_cache.Derived = field(repr=False)

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.raw[0].device

    def piece(self, row: int, start: int, stop: int) -> torch.Tensor:
        """Float32 task vector `row` at elements start..stop."""
        return self.raw[row + 1][start:stop].float() - self.raw[0][start:stop].float()

    def span(
        self,
        start: int,
        stop: int,
        into: torch.Tensor | None = None,
        rows: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 base [c] and the task vectors of `rows` (default: every source)
        [len(rows), c] of elements start..stop, formed in `into` (float32, at least
        (len(rows) + 1) x c elements) when given; only those rows are formed."""
        picked = self.raw[1:] if rows is None else [self.raw[r + 1] for r in rows]
        return _form([r[start:stop] for r in (self.raw[0], *picked)], into)


@dataclass(frozen=True, eq=False)
class TensorEntry:
    """What a SourceSet keeps of one tensor between builds (its weights are in `Weights`)."""

    name: str
    shape: torch.Size
    part: str | int
    stats: TensorStats
    cache: stats_cache.Derived = field(repr=False)

    @property
    def numel(self) -> int:
        return self.shape.numel()


class Slots(Sequence[TensorSlot]):
    """A SourceSet's tensors in group order, each formed as a `TensorSlot` when reached:
    iterating streams them (the host placement overlaps the next copy with this merge)."""

    def __init__(self, entries: tuple[TensorEntry, ...], weights: Weights):
        self._entries, self._weights = entries, weights

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> TensorSlot:  # type: ignore[override]
        entry = self._entries[i]
        return _slot(entry, next(self._weights.stream([entry.name])))

    def __iter__(self) -> Iterator[TensorSlot]:
        raw = self._weights.stream([e.name for e in self._entries])
        for entry, tensors in zip(self._entries, raw, strict=True):
            yield _slot(entry, tensors)


def _form(
    raw: list[torch.Tensor], into: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 base and task vectors of one tensor from its raw weights [base, source_1,
    ...] (the difference of two bf16/fp16 weights is exact in float32), in the flat float32
    `into` (at least len(raw) x numel elements) or new memory. A float32 weight is used where
    it is, never copied."""
    n = raw[0].numel()
    flat = (
        into[: len(raw) * n]
        if into is not None
        else raw[0].new_empty(len(raw) * n, dtype=torch.float32)
    )
    tv = flat[n:].view(len(raw) - 1, n)
    b = raw[0] if raw[0].dtype == torch.float32 else flat[:n].copy_(raw[0])
    for i, r in enumerate(raw[1:]):
        if r.dtype == torch.float32:
            torch.sub(r, b, out=tv[i])
        else:  # widen in place: no float32 temporary of each source
            tv[i].copy_(r).sub_(b)
    return b, tv


def _buffered(
    names: Sequence[str], weights: Weights
) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """Each tensor's raw weights in turn, with one buffer to form them whole in (the
    statistics pass), which the next tensor reuses: a fresh float32 temporary per tensor
    costs the CPU a page fault per 4 KiB it touches. The buffer grows to the largest tensor
    (the embedding, first in group order), the peak a tensor-by-tensor pass has anyway."""
    into = torch.empty(0)
    for raw in weights.stream(names):
        if into.numel() < len(raw) * raw[0].numel():
            into = raw[0].new_empty(len(raw) * raw[0].numel(), dtype=torch.float32)
        yield raw, into


def _slot(entry: TensorEntry, raw: list[torch.Tensor]) -> TensorSlot:
    s = entry.stats
    return TensorSlot(entry.name, entry.shape, entry.part, raw, s.l1, s.gram, s.grid, entry.cache)


@dataclass(frozen=True, eq=False)
class SourceSet:
    """A base model and sources, kept where `placement` says, ready for candidate builds."""

    base_name: str
    names: tuple[str, ...]
    paths: dict[str, Path]
    config: PretrainedConfig
    layout: Layout
    device: torch.device
    entries: tuple[TensorEntry, ...]
    weights: Weights

    @property
    def placement(self) -> Placement:
        return self.weights.placement

    @property
    def slots(self) -> Slots:
        return Slots(self.entries, self.weights)

    @classmethod
    def load(
        cls,
        base: str | Path,
        sources: Sequence[str | Path],
        *,
        names: Sequence[str] | None = None,
        base_name: str | None = None,
        device: str | torch.device = "cpu",
        placement: Placement | str = Placement.DEVICE,
    ) -> SourceSet:
        """Load and check checkpoints; `names` and `base_name` are the references recipes use
        for the sources and the base (default: the str of each path).

        `placement`: see
        `evomerge.placement`. The statistics come from the on-disk cache when these
        checkpoints were loaded before; else one pass computes them and checks every weight.
        """
        names = tuple(str(p) for p in sources) if names is None else tuple(names)
        if len(names) != len(sources):
            raise ValueError(f"{len(names)} names given for {len(sources)} sources")
        base_name = str(base) if base_name is None else base_name
        if len(set(names)) != len(names) or base_name in names:
            raise ValueError(f"model names repeat: base {base_name!r}, sources {list(names)}")
        base_ckpt = Checkpoint.open(base)
        ckpts = [Checkpoint.open(p) for p in sources]
        layout = Layout.of(base_ckpt.config)
        order = _check_compatible(base_name, base_ckpt, names, ckpts, layout)
        check_shared_tokenizer(
            f"the base {base_name}", base_ckpt.path, names, [c.path for c in ckpts]
        )
        device = _concrete(torch.device(device))
        models = [base_ckpt, *ckpts]
        tensors = [name for name, _ in order]
        weights = open_weights(placement, models, tensors, device)
        files = [sorted(set(ck.files.values())) for ck in models]
        key = stats_cache.content_key(files, device)
        stats = stats_cache.load(key, tensors)
        if stats is None:  # then use the saved file, as the next worker will: mapped, shared
            computed = _statistics(tensors, weights, (base_name, *names))
            saved = stats_cache.save(key, computed)  # False: an unwritable cache, warned
            release_heap()  # the statistics pass's float32 temporaries
            stats = stats_cache.load(key, tensors) if saved else computed
        shapes = base_ckpt.shapes()
        entries = tuple(
            TensorEntry(
                name,
                torch.Size(shapes[name]),
                part,
                stats[name],
                stats_cache.Derived(key, name, device),
            )
            for name, part in order
        )
        paths = {base_name: base_ckpt.path} | {n: c.path for n, c in zip(names, ckpts, strict=True)}
        return cls(base_name, names, paths, base_ckpt.config, layout, device, entries, weights)

    @property
    def num_layers(self) -> int:
        return self.layout.num_layers

    def groups(self, granularity: int = 1) -> tuple[str, ...]:
        return layer_group_names(self.num_layers, granularity)

    def index(self, name: str) -> int | None:
        """Row of `name`'s task vector; None for the base (its task vector is zero)."""
        if name == self.base_name:
            return None
        if name not in self.names:
            raise ValueError(
                f"model {name!r} is not loaded "
                f"(base {self.base_name!r}, sources {list(self.names)})"
            )
        return self.names.index(name)

    @cached_property
    def tokenizer(self):
        """The base model's tokenizer (the sources were checked to share its vocabulary)."""
        return AutoTokenizer.from_pretrained(self.paths[self.base_name])

    def new_model(self, dtype: str = "float32") -> torch.nn.Module:
        """A resident candidate model on this SourceSet's device, holding the base weights."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        with no_init_weights(), torch.device(self.device):
            model = AutoModelForCausalLM.from_config(self.config, dtype=DTYPES[dtype])
        model.tie_weights()  # skipped under no_init_weights
        params = dict(model.named_parameters(remove_duplicate=False))
        raw = self.weights.stream([e.name for e in self.entries])
        with torch.no_grad():
            for entry, tensors in zip(self.entries, raw, strict=True):
                params[entry.name].copy_(tensors[0].view(entry.shape))
        return model.eval().requires_grad_(False)


def load_model(
    path: str | Path, dtype: str = "float32", device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """A whole checkpoint as an inference model (a data-flow route's unmerged model), read
    straight onto `device`: through host memory first, 8 GPU workers of a node would each
    hold a 7B model's 14.5 GB there at once."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    on = _concrete(torch.device(device))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], device_map=on)
    return model.eval().requires_grad_(False)


def _concrete(device: torch.device) -> torch.device:
    """`cuda` -> `cuda:N` (the current device), so that it compares equal to tensors' devices."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _check_compatible(
    base_name: str,
    base: Checkpoint,
    names: Sequence[str],
    ckpts: Sequence[Checkpoint],
    layout: Layout,
) -> list[tuple[str, str | int]]:
    """Same architecture, tensors and shapes everywhere; returns tensors in group order."""
    cfg = base.config
    for name, ck in zip(names, ckpts, strict=True):
        if ck.config.model_type != cfg.model_type:
            raise ValueError(
                f"{name} is a {ck.config.model_type!r} model but the base {base_name} is "
                f"{cfg.model_type!r}: architectures must match"
            )
        for key in SHAPE_KEYS:
            a, b = getattr(cfg, key, None), getattr(ck.config, key, None)
            if a != b:
                what = "vocabularies differ" if key == "vocab_size" else "architectures differ"
                raise ValueError(f"{what}: {key} is {b} in {name} but {a} in the base {base_name}")
    shapes = base.shapes()
    parts = layout.parts(shapes, f"base {base_name}")
    for name, ck in zip(names, ckpts, strict=True):
        other = ck.shapes()
        if set(other) - layout.tied != set(parts):
            lacks = sorted(set(parts) - set(other))
            extra = sorted(set(other) - set(parts) - layout.tied)
            raise ValueError(
                f"{name} does not hold the base's tensors: missing {lacks}, extra {extra}"
            )
        for tensor in parts:
            if other[tensor] != shapes[tensor]:
                raise ValueError(
                    f"shape mismatch for {tensor}: {list(other[tensor])} in {name}, "
                    f"{list(shapes[tensor])} in the base {base_name}"
                )
    rank = {EMBED: -1, NORM: layout.num_layers, LM_HEAD: layout.num_layers + 1}
    return sorted(parts.items(), key=lambda kv: (rank.get(kv[1], kv[1]), kv[0]))


def vocab_of(folder: Path) -> dict[str, int] | None:
    """The token -> id map of a checkpoint folder's tokenizer, or None when it has none."""
    return AutoTokenizer.from_pretrained(folder).get_vocab() if has_tokenizer(folder) else None


def ids_differing(a: dict[str, int], b: dict[str, int]) -> int:
    """How many (token, id) pairs two vocabularies do not share (0: the same tokenizer)."""
    return len(set(a.items()) ^ set(b.items()))


def check_shared_tokenizer(
    first: str,
    first_path: str | Path,
    names: Sequence[str],
    paths: Sequence[str | Path],
    *,
    what: str = "merges",
) -> None:
    """Refuse models whose tokenizer maps tokens to other ids than `first`'s: a merge or a
    mixture needs the same ids to mean the same tokens in every model."""
    vocab = vocab_of(Path(first_path))
    if vocab is None:
        return
    for name, path in zip(names, paths, strict=True):
        other = vocab_of(Path(path))
        if other is not None and (differ := ids_differing(vocab, other)):
            raise ValueError(
                f"tokenizers differ: {name} and {first} disagree on {differ} token ids; "
                f"evomerge {what} models that share a tokenizer (fusion takes the others)"
            )


def _statistics(
    tensors: Sequence[str], weights: Weights, models: Sequence[str]
) -> dict[str, TensorStats]:
    """One pass over every weight: refuse non-float and non-finite ones, compute statistics."""
    stats = {}
    for name, (raw, into) in zip(tensors, _buffered(tensors, weights), strict=True):
        for model, t in zip(models, raw, strict=True):
            if not t.is_floating_point():
                raise ValueError(f"{model}: tensor {name} is {t.dtype}, not floating point")
            if not torch.isfinite(t).all():
                raise ValueError(f"{model}: tensor {name} has NaN or inf values")
        stats[name] = TensorStats.of(*_form(raw, into))
    return stats
