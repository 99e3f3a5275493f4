"""A fusion job: FuseLLM's continual training of a target on its sources' fused distributions.

`FusionConfig` is validated like a study config (a `ConfigError` names the field or file,
and nothing is written). `prepare` runs each source over the corpus once (cached by content,
`distributions`), aligns every line to the target's tokens and fuses the sources (MinCE or
AvgCE); `train` then minimises λ·L_CLM + (1 - λ)·L_fusion, where L_fusion is the
cross-entropy of the target's next-token distribution against the fused top-k one. λ = 1 is
the CLM-only control on the same text and steps.

Training is deterministic and resumable: batch s is drawn from `seed` and s alone, and a
checkpoint holds the model, the optimizer and the losses so far, written to a temporary
folder and renamed, so a job killed at any point resumes from its last checkpoint and ends
with the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field

from evomerge.config import ConfigError, ZooSize, anchor, parse_config, read_config
from evomerge.fusion.align import VocabMapping, align_distributions, align_tokens
from evomerge.fusion.distributions import distributions, load, read_corpus
from evomerge.fusion.fuse import fuse
from evomerge.killpoints import kill_point

Say = Callable[[str], None]


class TrainSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(200, gt=0, le=10_000_000)
    lr: float = Field(1e-4, gt=0, allow_inf_nan=False)
    batch: int = Field(16, gt=0, le=65536)
    max_length: int = Field(128, gt=1, le=1_000_000)
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(50, gt=0)


class EvalSettings(BaseModel):
    """Held-out tasks the fused target, the target before and every source are scored on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tasks: tuple[str, ...] = Field(min_length=1)
    limit: int | None = Field(None, gt=0)


class FusionConfig(BaseModel):
    """One fusion job. Model refs are folders or `zoo:NAME` (see `zoo`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=100)
    zoo: ZooSize | None = None
    target: str
    sources: tuple[str, ...] = Field(min_length=1)
    corpus: str
    k: int = Field(10, gt=0, le=1000, description="top-k tokens kept per source and position")
    alignment: Literal["mined", "exact"] = "mined"
    fusion: Literal["min_ce", "avg_ce"] = "min_ce"
    lam: float = Field(
        0.9, ge=0, le=1, allow_inf_nan=False, description="weight of L_CLM; 1 = CLM only"
    )
    train: TrainSettings = TrainSettings()
    workers: int = Field(
        1,
        ge=0,
        le=4096,
        description="Ray workers: distribution-pass shards, and Ray Train's data-parallel "
        "workers (0: both in this process, no Ray)",
    )
    ray_address: str | None = None
    evaluate: EvalSettings | None = None
    out: str | None = Field(
        None, description="where checkpoints and the fused model go (default: the cache)"
    )
    storage: str | None = None

    def control(self) -> FusionConfig:
        """The CLM-only control: the same text, steps and seed, λ = 1 (job `<name>-clm`)."""
        out = None if self.out is None else f"{self.out}-clm"  # never the fused job's folder
        return self.model_copy(update={"name": f"{self.name}-clm", "lam": 1.0, "out": out})

    def out_dir(self) -> Path:
        from evomerge.cachedir import cache_root

        return Path(self.out) if self.out else cache_root() / "fusion-jobs" / self.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)

    @classmethod
    def load(cls, path: str | Path, **overrides: object) -> FusionConfig:
        """Read and validate a YAML file; relative paths are relative to it."""
        p = Path(path)
        cfg = parse_config(cls, read_config(p), str(p), "fusion", **overrides)
        folder = p.parent
        evaluate = cfg.evaluate
        if evaluate is not None:
            tasks = tuple(anchor(t, folder) for t in evaluate.tasks)
            evaluate = evaluate.model_copy(update={"tasks": tasks})
        return cfg.model_copy(
            update={
                "target": anchor(cfg.target, folder),
                "sources": tuple(anchor(s, folder) for s in cfg.sources),
                "corpus": anchor(cfg.corpus, folder),
                "evaluate": evaluate,
                "out": None if cfg.out is None else anchor(cfg.out, folder),
            }
        )

    def paths(self) -> tuple[Path, list[Path], Path]:
        """(target, sources, corpus) resolved; the first missing one raises, by name."""
        from evomerge.zoo import default_zoo_dir, resolve_model

        zoo_dir = default_zoo_dir(self.zoo or "demo")
        corpus = Path(self.corpus)
        if self.corpus.startswith("zoo:"):
            corpus = zoo_dir / self.corpus[4:]
        return (
            resolve_model(self.target, zoo_dir),
            [resolve_model(s, zoo_dir) for s in self.sources],
            corpus,
        )

    def check(self) -> tuple[Path, list[Path], list[str]]:
        """Everything that can be checked before anything is written: the models are causal
        LMs with tokenizers, the corpus has text, the target's tokenizer encodes all of it.
        Returns (target, sources, corpus lines); raises ConfigError naming the problem."""
        from transformers import AutoConfig, AutoTokenizer
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        try:
            target, sources, corpus = self.paths()
            lines = read_corpus(corpus)
        except (OSError, ValueError) as e:
            raise ConfigError(str(e)) from e
        for ref, path in zip((self.target, *self.sources), (target, *sources), strict=True):
            config = AutoConfig.from_pretrained(path)
            if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
                raise ConfigError(f"{ref}: {config.model_type!r} is not a causal language model")
        tokenizer = AutoTokenizer.from_pretrained(target)
        unk = tokenizer.unk_token_id
        for n, line in enumerate(lines, 1):
            ids = tokenizer(line)["input_ids"]
            if not ids or (unk is not None and unk in ids):
                raise ConfigError(
                    f"target {self.target}: its tokenizer cannot encode corpus line {n}: {line!r}"
                )
        return target, sources, lines


@dataclass
class Example:
    """One corpus line on the target's tokens, with the fused distribution of each token
    (row i: the distribution that predicted token i)."""

    tokens: torch.Tensor  # [T]
    ids: torch.Tensor  # [T, k]
    probs: torch.Tensor  # [T, k]


def prepare(config: FusionConfig, say: Say | None = None) -> list[Example]:
    """Distributions of every source (cached), aligned to the target and fused per line."""
    from transformers import AutoTokenizer

    target, sources, lines = config.check()
    cfg, corpus = config, config.paths()[2]
    tgt_tok = AutoTokenizer.from_pretrained(target)
    targets = [torch.tensor(tgt_tok(line)["input_ids"][: cfg.train.max_length]) for line in lines]
    per_source = []
    for path in sources:
        file = distributions(
            path, corpus, cfg.k, max_length=cfg.train.max_length, workers=cfg.workers, progress=say
        )
        src_tok = AutoTokenizer.from_pretrained(path)
        mapping = VocabMapping(src_tok.get_vocab(), tgt_tok.get_vocab(), mode=cfg.alignment)
        aligned = []
        for (tokens, ids, probs), gold in zip(load(file), targets, strict=True):
            pairs = align_tokens(
                src_tok.convert_ids_to_tokens(tokens.tolist()),
                tgt_tok.convert_ids_to_tokens(gold.tolist()),
                mode=cfg.alignment,
            )
            aligned.append(align_distributions(pairs, ids, probs, gold, mapping, k=cfg.k))
        per_source.append(aligned)
    examples = []
    for i, gold in enumerate(targets):
        ids, probs = fuse([s[i] for s in per_source], gold, cfg.fusion, cfg.k)
        examples.append(Example(gold, ids, probs))
    return examples


def _batch(examples: list[Example], rows: list[int], pad: int):
    """Right-padded tokens, mask, fused ids and probabilities (padding: probability 0)."""
    width = max(len(examples[r].tokens) for r in rows)
    k = examples[rows[0]].ids.shape[1]
    x = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    ids = torch.zeros(len(rows), width, k, dtype=torch.long)
    probs = torch.zeros(len(rows), width, k)
    for b, r in enumerate(rows):
        e, n = examples[r], len(examples[r].tokens)
        x[b, :n], mask[b, :n], ids[b, :n], probs[b, :n] = e.tokens, 1, e.ids, e.probs
    return x, mask, ids, probs


def losses(
    model: torch.nn.Module, batch, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(λ·clm + (1 - λ)·fusion, clm, fusion) of one batch, per predicted token."""
    x, mask, ids, probs = batch
    logp = F.log_softmax(model(input_ids=x, attention_mask=mask.long()).logits[:, :-1].float(), -1)
    valid = mask[:, 1:]
    count = valid.sum().clamp(min=1)
    clm = -(logp.gather(-1, x[:, 1:, None])[..., 0] * valid).sum() / count
    fusion = -((logp.gather(-1, ids[:, 1:]) * probs[:, 1:]).sum(-1) * valid).sum() / count
    return lam * clm + (1 - lam) * fusion, clm, fusion


CHECKPOINT = "checkpoint"


def train(
    config: FusionConfig,
    examples: list[Example],
    out: Path,
    say: Say | None = None,
    on_checkpoint: Callable[[list[dict]], None] | None = None,
    *,
    rank: int = 0,
    world: int = 1,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
) -> Path:
    """Train a copy of the target in `out` (resuming from `out/checkpoint`); returns the
    final model folder `out/model`. `on_checkpoint` gets the steps since the last checkpoint
    (or since the one resumed from) each time one is written.

    Data-parallel: worker `rank` of `world` takes every world-th row of each step's batch and
    `wrap` (DDP) averages the gradients; rank 0 alone writes checkpoints and reports."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = config.train
    target = config.paths()[0]
    ckpt = out / CHECKPOINT
    old = ckpt.with_name(f".{CHECKPOINT}.old")
    if rank == 0 and not ckpt.exists() and old.exists():  # killed between the two renames
        old.rename(ckpt)
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_pretrained(ckpt if ckpt.is_dir() else target)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    history: list[dict] = []
    start = 0
    if ckpt.is_dir():
        state = torch.load(ckpt / "trainer.pt", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        history = json.loads((ckpt / "losses.json").read_text())
        if say and rank == 0:
            say(f"resuming {config.name} at step {start}")
    trained = wrap(model) if wrap else model
    tokenizer = AutoTokenizer.from_pretrained(target)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    reported = start
    for step in range(start, settings.steps):
        rows = random.Random(f"{settings.seed}:{step}").choices(
            range(len(examples)), k=settings.batch
        )[rank::world]
        opt.zero_grad(set_to_none=True)
        loss, clm, fusion = losses(trained, _batch(examples, rows, pad), config.lam)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{config.name}: loss is {loss.item()} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        kill_point("fusion-step")
        history.append(
            {"step": step + 1, "loss": loss.item(), "clm": clm.item(), "fusion": fusion.item()}
        )
        done = step + 1
        if rank == 0 and (done % settings.checkpoint_every == 0 or done == settings.steps):
            _checkpoint(model, opt, done, history, ckpt)
            if on_checkpoint:
                on_checkpoint(history[reported:])
                reported = done
            if say:
                say(f"{config.name}: step {done}/{settings.steps} loss {loss.item():.4f}")
    final = out / "model"
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(ckpt, final, ignore=shutil.ignore_patterns("trainer.pt"))
        tokenizer.save_pretrained(final)
    return final


def save_examples(examples: list[Example], path: Path) -> None:
    """The fused data in one safetensors file, for training workers on other processes."""
    from safetensors.torch import save_file

    lengths = torch.tensor([len(e.tokens) for e in examples])
    save_file(
        {
            "lengths": lengths,
            "tokens": torch.cat([e.tokens for e in examples]),
            "ids": torch.cat([e.ids for e in examples]),
            "probs": torch.cat([e.probs for e in examples]),
        },
        str(path),
    )


def load_examples(path: Path) -> list[Example]:
    from safetensors.torch import load_file

    data = load_file(str(path))
    bounds = [0, *data["lengths"].cumsum(0).tolist()]
    return [
        Example(data["tokens"][a:b], data["ids"][a:b], data["probs"][a:b])
        for a, b in pairwise(bounds)
    ]


def train_on_ray(
    config: FusionConfig,
    examples: list[Example],
    out: Path,
    storage_url: str,
) -> Path:
    """`train` on Ray Train: `config.workers` data-parallel workers (a GPU each when the
    cluster has them); rank 0 records each checkpoint's steps in the store at `storage_url`."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from workers.pool import connect

    out.mkdir(parents=True, exist_ok=True)
    data = out / "fused.safetensors"
    save_examples(examples, data)
    workers = config.workers
    connect(config.ray_address)
    gpu = ray.cluster_resources().get("GPU", 0) >= workers
    trainer = TorchTrainer(
        _ray_loop,
        train_loop_config={
            "config": config.model_dump_json(),
            "data": str(data),
            "out": str(out),
            "storage": storage_url,
        },
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu),
        run_config=RunConfig(storage_path=str(out / "ray"), name=config.name),
    )
    trainer.fit()
    return out / "model"


def _ray_loop(loop: dict) -> None:
    """One Ray Train worker: the fused data from disk, DDP, the store for rank 0's steps."""
    import ray.train
    import ray.train.torch

    from storage import Store

    config = FusionConfig.model_validate_json(loop["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    store = Store(loop["storage"]) if rank == 0 else None

    def record(steps: list[dict]) -> None:
        assert store is not None
        store.record_fusion_steps(config.name, steps)

    train(
        config,
        load_examples(Path(loop["data"])),
        Path(loop["out"]),
        say=lambda line: print(line, flush=True),
        on_checkpoint=record if store else None,
        rank=rank,
        world=world,
        wrap=ray.train.torch.prepare_model if world > 1 else None,
    )


def _checkpoint(model, opt, step: int, history: list[dict], ckpt: Path) -> None:
    """Model, optimizer, step and losses, written beside `ckpt` and renamed over it."""
    tmp = ckpt.with_name(f".{CHECKPOINT}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    torch.save({"optimizer": opt.state_dict(), "step": step}, tmp / "trainer.pt")
    (tmp / "losses.json").write_text(json.dumps(history))
    old = ckpt.with_name(f".{CHECKPOINT}.old")
    if ckpt.exists():
        ckpt.rename(old)
    kill_point("fusion-swap")
    tmp.rename(ckpt)
    shutil.rmtree(old, ignore_errors=True)
