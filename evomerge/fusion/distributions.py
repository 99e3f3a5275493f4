"""FuseLLM's first pass: each source's top-k next-token distributions over a corpus, on disk.

A source reads every line of the corpus once; per token it keeps the k most probable next
tokens and their probabilities (int32 ids and float16 probabilities: 6k bytes a token, 60
bytes at k = 10, against 128k for a full 32k-vocabulary row of float32). The file is cached
under a key of the model's content (`stats_cache.content_key`), the corpus's bytes, k and the
length limit, so later jobs on the same corpus and the same source read it back instead of
running the source again.

Layout (one safetensors file): `tokens` [N] the source's token ids of every line, one after
the other; `offsets` [lines + 1] where each line starts in `tokens`; `ids`, `probs` [N, k]:
row i is the distribution that predicted token i (the model's output at token i - 1; a
line's first token, predicted by nothing, gets a one-hot row on itself).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.cachedir import cache_root
from evomerge.stats_cache import content_key

FORMAT = 1  # bump when the layout or what is stored changes


def read_corpus(path: str | Path) -> list[str]:
    """The corpus's non-empty lines; a missing, unreadable or empty file is refused by name."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"corpus file not found: {p}")
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text (byte {e.start})") from e
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"corpus file is empty: {p}")
    return lines


def cache_path(model: Path, corpus: Path, k: int, max_length: int) -> Path:
    """Where the distributions of `model` over `corpus` are cached."""
    files = sorted(model.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model}: no safetensors weights")
    h = hashlib.sha256(f"{FORMAT}\0{k}\0{max_length}\0".encode())
    h.update(content_key([files], torch.device("cpu")).encode())
    h.update(hashlib.sha256(corpus.read_bytes()).digest())
    h.update(AutoTokenizer.from_pretrained(model).backend_tokenizer.to_str().encode())
    return cache_root() / "fusion" / f"{h.hexdigest()[:24]}.safetensors"


def distributions(
    model_dir: str | Path,
    corpus: str | Path,
    k: int,
    *,
    max_length: int = 512,
    batch_size: int = 16,
    workers: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """The cached file of `model_dir`'s top-k distributions over `corpus` (computed once).

    With `workers` > 0 the corpus is cut into that many shards, each run by a Ray task (on a
    GPU when the cluster has one); with 0, in this process."""
    model_dir, corpus = Path(model_dir), Path(corpus)
    lines = read_corpus(corpus)
    out = cache_path(model_dir, corpus, k, max_length)
    if out.is_file():
        return out
    if workers:
        import ray

        from workers.pool import connect

        connect(None)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_gpus=gpus)(shard)
        size = -(-len(lines) // workers)
        parts = [lines[i : i + size] for i in range(0, len(lines), size)]
        refs = [task.remote(str(model_dir), part, k, max_length, batch_size) for part in parts]
        results = []
        for n, ref in enumerate(refs, 1):
            results.append(ray.get(ref))
            if progress:
                progress(f"{model_dir.name}: shard {n}/{len(refs)}")
        tokens, ids, probs = ([row for r in results for row in r[i]] for i in range(3))
    else:
        tokens, ids, probs = shard(str(model_dir), lines, k, max_length, batch_size, progress)
    offsets = torch.tensor([0, *torch.tensor([len(t) for t in tokens]).cumsum(0).tolist()])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{torch.randint(1 << 30, ()).item()}.tmp")
    save_file(
        {
            "tokens": torch.cat(tokens).int(),
            "offsets": offsets,
            "ids": torch.cat(ids).int(),
            "probs": torch.cat(probs).half(),
        },
        tmp,
    )
    tmp.rename(out)  # atomic: a reader never sees half a file
    return out


Rows = list[torch.Tensor]


@torch.inference_mode()
def shard(
    model_dir: str,
    lines: list[str],
    k: int,
    max_length: int,
    batch_size: int,
    progress: Callable[[str], None] | None = None,
) -> tuple[Rows, Rows, Rows]:
    """Per line of `lines`: the source's token ids, top-k ids and top-k probabilities (on
    the GPU when there is one)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [tokenizer(line)["input_ids"][:max_length] for line in lines]
    empty = next((i for i, seq in enumerate(encoded) if not seq), None)
    if empty is not None:
        raise ValueError(
            f"{model_dir}: its tokenizer encodes a corpus line to nothing: {lines[empty]!r}"
        )
    tokens, ids, probs = [], [], []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(map(len, batch))
        x = torch.tensor([seq + [pad] * (width - len(seq)) for seq in batch], device=device)
        lengths = torch.tensor([len(s) for s in batch], device=device)
        mask = (torch.arange(width, device=device)[None] < lengths[:, None]).long()
        top = model(input_ids=x, attention_mask=mask).logits.float().softmax(-1).topk(k, -1)
        top_ids, top_probs = top.indices.cpu(), top.values.cpu()
        for row, seq in enumerate(batch):
            n = len(seq)
            first_ids = torch.full((1, k), seq[0])
            first_probs = torch.zeros(1, k).index_fill_(1, torch.tensor([0]), 1.0)
            ids.append(torch.cat([first_ids, top_ids[row, : n - 1]]))
            probs.append(torch.cat([first_probs, top_probs[row, : n - 1]]))
            tokens.append(torch.tensor(seq))
        if progress:
            progress(
                f"{Path(model_dir).name}: {min(start + batch_size, len(encoded))}/{len(encoded)}"
            )
    return tokens, ids, probs


def load(path: str | Path) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per corpus line: (source token ids [T], top-k ids [T, k], probabilities [T, k])."""
    data = load_file(str(path))
    offsets = data["offsets"].tolist()
    return [
        (
            data["tokens"][a:b].long(),
            data["ids"][a:b].long(),
            data["probs"][a:b].float(),
        )
        for a, b in pairwise(offsets)
    ]
