"""Model shape and the training loop of the zoo, small enough to hold in one's head.

One call of `train` is one model: from scratch (base, stranger) or from a parent folder
(experts). Batches are generated on the fly from the skills, so there is no dataset to store;
prompts (and text lines) of the evaluation splits are rejected, so no evaluated example is
ever trained on. A job runs on one torch thread (`Job.threads`): jobs run side by side in
processes, and two threads per job on a shared two-core machine made steps up to 20 times
slower; only a job that trains alone (the cross-skill zoo's base) takes two.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.utils import logging as hf_logging

from evomerge.zoo.skills import ANY_SKILL, sample_text
from evomerge.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB, build_tokenizer, encode

TEXT = "text"  # the plain-text genre of the corpus, next to the skills
Row = tuple[list[int], list[int]]  # input ids, labels (-100: no loss)


@dataclass(frozen=True)
class Shape:
    """Llama hyper-parameters of a zoo's models (equal across a zoo, so they can merge)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    max_positions: int = 64

    def config(self, arch: str = "llama", codec: Codec | None = None) -> PretrainedConfig:
        """The model config of `arch` (llama, or qwen2 for the fusion sources) for `codec`'s
        vocabulary (default: the zoo's characters)."""
        codec = codec or CHAR
        return {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](
            vocab_size=codec.size,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.max_positions,
            tie_word_embeddings=False,
            bos_token_id=codec.bos,
            eos_token_id=codec.eos,
            pad_token_id=codec.pad,
        )


@dataclass(frozen=True)
class Codec:
    """How a job's text becomes token ids: the zoo's characters, or a tokenizer's (the fusion
    sources' BPE), with its special ids."""

    encode: Callable[[str], list[int]]
    size: int
    bos: int
    eos: int
    pad: int

    @classmethod
    def of(cls, tokenizer: Any) -> Codec:
        cache: dict[str, list[int]] = {}

        def encode(text: str) -> list[int]:
            if text not in cache:
                cache[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
            return cache[text]

        ids = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        return cls(encode, len(tokenizer), *ids)


CHAR = Codec(encode, len(VOCAB), BOS_ID, EOS_ID, PAD_ID)
CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}


@dataclass(frozen=True)
class Job:
    """One training run.

    `mix` weighs the genres of a batch (skill names and `"text"`); `full` lists the skills
    drawn from their full range (the others use their partial range). `answer_only` puts
    the loss of skill examples on their answer tokens, so an expert changes what it answers
    rather than re-learning a distribution of random prompts. `corrupt` pairs each prompt
    with another example's answer (Model-GLUE's harmful model: fine-tuned on bad labels).
    """

    name: str
    steps: int
    lr: float
    mix: dict[str, float]
    seed: int
    full: tuple[str, ...] = ()
    answer_only: bool = True
    batch: int = 64
    warmup: int = 50
    weight_decay: float = 0.0
    shape: Shape = field(default_factory=Shape)
    corrupt: bool = False  # skill answers come from another example: a harmful fine-tune
    arch: str = "llama"  # qwen2: the fusion sources, of another architecture
    threads: int = 1  # 2 only for a job that trains alone on the two cores
    # Decoder layers [first, stop) train, the rest stay frozen; embeddings train with the
    # first layer, the final norm and the head with the last. None: every parameter trains.
    layers: tuple[int, int] | None = None


def replay_mix(broad: dict[str, float], skill: str, replay: float) -> dict[str, float]:
    """A fine-tune's mix: `replay` of its batches from the `broad` mix, the rest `skill`."""
    total = sum(broad.values())
    mix = {k: replay * v / total for k, v in broad.items()}
    mix[skill] = mix.get(skill, 0.0) + (1 - replay)
    return mix


def make_batch(
    job: Job, rng: random.Random, exclude: Collection[str], codec: Codec = CHAR
) -> list[Row]:
    """One batch of rows drawn from the job's mix, none of them in `exclude`."""
    genres, weights = zip(*job.mix.items(), strict=True)
    rows = []
    for genre in rng.choices(genres, weights, k=job.batch):
        while True:
            if genre == TEXT:
                prompt, answer = "", sample_text(rng)
            else:
                prompt, answer = ANY_SKILL[genre].sample(rng, genre in job.full)
                if job.corrupt:
                    answer = ANY_SKILL[genre].sample(rng, genre in job.full)[1]
            if (prompt or answer) not in exclude:
                break
        p, a = codec.encode(prompt), [*codec.encode(answer), codec.eos]
        ids = [codec.bos, *p, *a]
        if job.answer_only and genre != TEXT:
            rows.append((ids, [-100] * (1 + len(p)) + a))
        else:
            rows.append((ids, [-100, *ids[1:]]))
    return rows


def backward(model: torch.nn.Module, rows: list[Row], chunks: int = 4, pad: int = PAD_ID) -> float:
    """Accumulate the gradient of the batch's mean token loss; returns that loss.

    Rows are sorted by length and split into `chunks` micro-batches, so little compute goes
    to padding (examples range from 6 to 35 tokens). Right padding needs no attention mask.
    """
    rows = sorted(rows, key=lambda r: len(r[0]))
    n_tokens = sum(sum(t != -100 for t in y) for _, y in rows)
    size = math.ceil(len(rows) / chunks)
    total = 0.0
    for i in range(0, len(rows), size):
        part = rows[i : i + size]
        width = max(len(x) for x, _ in part)
        x = torch.tensor([r + [pad] * (width - len(r)) for r, _ in part])
        y = torch.tensor([r + [-100] * (width - len(r)) for _, r in part])
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )
        (loss / n_tokens).backward()
        total += loss.item()
    return total / n_tokens


def lr_at(job: Job, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < job.warmup:
        return job.lr * (step + 1) / job.warmup
    t = (step - job.warmup) / max(1, job.steps - job.warmup)
    return job.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def _trains(job: Job, name: str) -> bool:
    """Whether the parameter `name` (a Llama/Qwen2 parameter name) trains in `job`."""
    if job.layers is None:
        return True
    first, stop = job.layers
    if name.startswith("model.layers."):
        return first <= int(name.split(".")[2]) < stop
    if name.startswith("model.embed_tokens."):
        return first == 0
    return stop == job.shape.layers  # the final norm and the head


def train(
    job: Job,
    out: Path,
    parent: Path | None = None,
    exclude: Collection[str] = (),
    log: Callable[[str], None] | None = None,
    tokenizer: Any = None,
) -> float:
    """Train one model and save it as a Hugging Face folder at `out`; returns the seconds.
    With `tokenizer` (the fusion sources' BPE) text is encoded by it instead of by the zoo's
    characters, and saved with the model."""
    torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)
    rng = random.Random(job.seed)
    codec = CHAR if tokenizer is None else Codec.of(tokenizer)
    if parent is None:
        model = CLASSES[job.arch](job.shape.config(job.arch, codec))
    else:
        model = LlamaForCausalLM.from_pretrained(parent)
    model.train()
    params = [p for name, p in model.named_parameters() if _trains(job, name)]
    opt = torch.optim.AdamW(params, lr=job.lr, betas=(0.9, 0.95), weight_decay=job.weight_decay)
    start = time.perf_counter()
    for step in range(job.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(job, step)
        opt.zero_grad(set_to_none=True)
        loss = backward(model, make_batch(job, rng, exclude, codec), pad=codec.pad)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log and (step % 250 == 0 or step == job.steps - 1):
            log(f"{job.name}: step {step + 1}/{job.steps} loss {loss:.3f}")
    seconds = time.perf_counter() - start
    save(model, out, tokenizer)
    return seconds


def run_job(args: tuple[Job, Path, Path | None, Collection[str], bool]) -> tuple[str, float]:
    """`train` for a process pool: (job, out, parent, exclude, progress) → (name, seconds)."""
    job, out, parent, exclude, progress = args
    log = (lambda line: print(line, flush=True)) if progress else None
    return job.name, train(job, out, parent=parent, exclude=exclude, log=log)


def save(model: torch.nn.Module, out: Path, tokenizer: Any = None) -> None:
    """Write a complete, offline-loadable folder: weights, config, tokenizer, generation."""
    tokenizer = tokenizer or build_tokenizer()
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    hf_logging.disable_progress_bar()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
