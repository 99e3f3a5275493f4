"""Score an in-memory model on proxy tasks: per-task metrics and one scalar fitness.

`Evaluator.score` runs once per candidate of a search, so everything that does not depend
on the model happens once: task files are read at construction, and each tokenizer's
encodings are computed on its first use and kept (keyed by the tokenizer object, which a
worker holds for a whole study). Native kinds run batched under `torch.inference_mode`;
generation is greedy with a KV cache and stops when every row has produced EOS. lm-eval
tasks run together in one `evaluate` call per score, through `HFLM` on the in-memory model,
with the TaskManager and the task dict built at construction (their `task_seconds` share
that call's time equally). For the toy zoo, score on one torch thread: on a shared two-core
machine a second thread made scoring twenty times slower.

Fitness is the weighted mean of the tasks' metrics oriented so that higher is better:
accuracies as they are, perplexity as its inverse exp(-mean token loss), which lies in
(0, 1] like an accuracy, and any other lower-is-better lm-eval metric negated. Non-finite
logits make the task's metric NaN, and so the fitness: a broken merge must not look merely
bad.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from evomerge.config import EVAL_BATCH
from evomerge.kvcache import cache_keyword, output_cache
from evomerge.tasks import TaskSpec, load_task


@dataclass(frozen=True)
class Score:
    """Per-task metrics (each in its own orientation), the fitness and the seconds spent."""

    metrics: dict[str, float]
    fitness: float
    seconds: float
    task_seconds: dict[str, float] = field(default_factory=dict)


class NonFiniteLogits(ArithmeticError):
    """The model produced NaN or infinite logits."""


def _oriented(spec: TaskSpec, value: float) -> float:
    if not spec.lower_is_better:
        return value
    return 1.0 / value if spec.kind == "perplexity" else -value


def _check_finite(logits: torch.Tensor) -> None:
    if not torch.isfinite(logits).all():
        raise NonFiniteLogits


def _encode(tokenizer: Any, spec: TaskSpec, text: str, where: str) -> list[int]:
    """Token ids with the tokenizer's special tokens; an error if a character became unk."""
    ids = tokenizer(text)["input_ids"]
    unk = tokenizer.unk_token_id
    if unk is not None and unk in ids and (tokenizer.unk_token or "") not in text:
        raise ValueError(
            f"task {spec.name!r} ({where}): the tokenizer cannot encode {text!r} "
            "(characters map to the unknown token)"
        )
    return ids


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


class Evaluator:
    """Scores models on fixed tasks, split and limit.

    `tasks` are `TaskSpec`s or references for `load_task` (`"zoo:add"`, a YAML path);
    `weights` default to equal. Pass `tokenizer` to encode (and validate) the data now.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec | str],
        weights: Sequence[float] | None = None,
        split: str = "search",
        limit: int | None = None,
        zoo_dir: Path | None = None,
        batch_size: int = EVAL_BATCH,
        tokenizer: Any = None,
    ) -> None:
        self.tasks = [t if isinstance(t, TaskSpec) else load_task(t, zoo_dir) for t in tasks]
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks repeat a name: {names}")
        if not self.tasks:
            raise ValueError("an Evaluator needs at least one task")
        self.weights = list(weights) if weights is not None else [1.0] * len(self.tasks)
        if len(self.weights) != len(self.tasks):
            raise ValueError(f"{len(self.weights)} weights for {len(self.tasks)} tasks")
        if sum(self.weights) <= 0 or any(w < 0 for w in self.weights):
            raise ValueError(f"weights must be >= 0 with a positive sum, got {self.weights}")
        self.split, self.limit, self.batch_size = split, limit, batch_size
        self.rows = {t.name: t.rows(split, limit) for t in self.tasks if t.kind != "lm_eval"}
        self._encoded: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
        self._lm_eval = None
        if any(t.kind == "lm_eval" for t in self.tasks):
            self._lm_eval = self._load_lm_eval()
        if tokenizer is not None:
            self._encodings(tokenizer)

    def score(self, model: torch.nn.Module, tokenizer: Any) -> Score:
        """Metrics and fitness of `model`; deterministic for a given model."""
        start = time.perf_counter()
        encoded = self._encodings(tokenizer)
        model.eval()
        metrics: dict[str, float] = {}
        seconds: dict[str, float] = {}
        if self._lm_eval is not None:
            t0 = time.perf_counter()
            metrics |= self._run_lm_eval(model, tokenizer)
            seconds |= dict.fromkeys(metrics, (time.perf_counter() - t0) / len(metrics))
        for spec in self.tasks:
            if spec.kind == "lm_eval":
                continue
            t0 = time.perf_counter()
            run, rows, enc = _NATIVE[spec.kind], self.rows[spec.name], encoded[spec.name]
            try:
                metrics[spec.name] = run(spec, model, tokenizer, rows, enc, self.batch_size)
            except NonFiniteLogits:
                metrics[spec.name] = math.nan
            seconds[spec.name] = time.perf_counter() - t0
        fitness = sum(
            w * _oriented(s, metrics[s.name]) for s, w in zip(self.tasks, self.weights, strict=True)
        ) / sum(self.weights)
        return Score(metrics, fitness, time.perf_counter() - start, seconds)

    def _encodings(self, tokenizer: Any) -> dict[str, Any]:
        if tokenizer not in self._encoded:
            self._encoded[tokenizer] = {
                s.name: _ENCODERS[s.kind](tokenizer, s, self.rows[s.name])
                for s in self.tasks
                if s.kind != "lm_eval"
            }
        return self._encoded[tokenizer]

    def _load_lm_eval(self) -> Any:
        """One TaskManager and one loaded task dict (datasets read once) for every score."""
        from lm_eval.tasks import TaskManager

        includes = sorted({str(t.include_path) for t in self.tasks if t.include_path})
        manager = TaskManager(include_path=includes or None)
        return manager.load([self._lm_eval_name(t) for t in self.tasks if t.kind == "lm_eval"])

    def _lm_eval_name(self, spec: TaskSpec) -> str:
        assert spec.lm_eval_task is not None
        return spec.lm_eval_task.replace("{split}", self.split)

    def _run_lm_eval(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
        """Every lm-eval task in one `evaluate` call on the in-memory model."""
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        specs = [t for t in self.tasks if t.kind == "lm_eval"]
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            # lm-eval would take the argmax of NaN scores and report a number.
            return {s.name: math.nan for s in specs}
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
        out = evaluate(
            lm=lm,
            task_dict=self._lm_eval,
            limit=self.limit,
            bootstrap_iters=0,
            log_samples=False,
            verbosity="ERROR",
        )
        metrics = {}
        for spec in specs:
            name = self._lm_eval_name(spec)
            results = out["results"][name]
            key = next((k for k in results if k.split(",")[0] == spec.metric_name), None)
            if key is None:
                raise KeyError(f"lm-eval task {name!r} reports no {spec.metric_name!r}: {results}")
            metrics[spec.name] = float(results[key])
        return metrics


# --- encoding, once per tokenizer ------------------------------------------------------


def _encode_generate(tokenizer: Any, spec: TaskSpec, rows: list[dict]) -> list[list[int]]:
    return [_encode(tokenizer, spec, r["prompt"], f"row {i}") for i, r in enumerate(rows)]


def _encode_choice(tokenizer: Any, spec: TaskSpec, rows: list[dict]) -> list[tuple]:
    """(context ids, [continuation ids per choice]) split as lm-eval's `_encode_pair` does:
    trailing spaces move to the continuation; the continuation is the tail of the whole."""
    out = []
    for i, r in enumerate(rows):
        ctx = r["prompt"]
        ctx_ids = _encode(tokenizer, spec, ctx.rstrip(), f"row {i}")
        spaces = ctx[len(ctx.rstrip()) :]
        conts = []
        for choice in r["choices"]:
            whole = _encode(tokenizer, spec, ctx.rstrip() + spaces + choice, f"row {i}")
            conts.append(whole[len(ctx_ids) :])
        out.append((ctx_ids, conts))
    return out


def _encode_perplexity(tokenizer: Any, spec: TaskSpec, rows: list[dict]) -> list[list[int]]:
    out = [_encode(tokenizer, spec, r["text"], f"row {i}") for i, r in enumerate(rows)]
    if not any(len(ids) > 1 for ids in out):
        raise ValueError(f"task {spec.name!r}: no text of two or more tokens to score")
    return out


_ENCODERS = {
    "generate": _encode_generate,
    "choice": _encode_choice,
    "perplexity": _encode_perplexity,
}
# Tokens one encoded row puts in a batch: a prompt, a text, a context and its longest choice.
_WIDTH = {"generate": len, "perplexity": len, "choice": lambda e: len(e[0]) + max(map(len, e[1]))}


def longest_sequence(
    tokenizer: Any, tasks: Sequence[TaskSpec], limits: dict[str, int | None]
) -> int | None:
    """Tokens in the longest row the native `tasks` score in the splits of `limits` (split:
    row limit), as the Evaluator encodes them; None when every task is lm-eval's (its rows
    are read by lm-eval). A batch is as wide as its longest row: the evaluation's memory."""
    widths = [
        _WIDTH[spec.kind](encoded)
        for spec in tasks
        if spec.kind != "lm_eval"
        for split, limit in limits.items()
        for encoded in _ENCODERS[spec.kind](tokenizer, spec, spec.rows(split, limit))
    ]
    return max(widths, default=None)


# --- the three native kinds ------------------------------------------------------------


def _pad_right(seqs: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(map(len, seqs))
    return torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else tokenizer.eos_token_id


def _sequence_logprobs(
    model: torch.nn.Module, seqs: list[list[int]], pad: int, batch_size: int
) -> list[torch.Tensor]:
    """Per sequence, the log-probability of each token given the ones before it.

    Right padding needs no attention mask: causal attention never looks ahead. The float32
    log-softmax is taken a sequence at a time: the batch's logits stay in the model's dtype,
    where a float32 copy and log-softmax of them all would take 4.5x as much (11 GB at a
    batch of 128 x 256 tokens and a 32000 vocabulary).
    """
    device = next(model.parameters()).device
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    with torch.inference_mode():
        for batch in _batches(order, batch_size):
            ids = _pad_right([seqs[i] for i in batch], pad, device)
            logits = model(input_ids=ids).logits
            _check_finite(logits)
            for row, i in enumerate(batch):
                n = len(seqs[i]) - 1
                logp = F.log_softmax(logits[row, :n].float(), dim=-1)
                out[i] = logp.gather(-1, ids[row, 1 : n + 1, None])[:, 0].cpu()
            del logits
    return out


def _choice(
    spec: TaskSpec, model, tokenizer, rows: list[dict], encoded: list[tuple], batch_size: int
) -> float:
    seqs, index = [], []
    for r, (ctx, conts) in enumerate(encoded):
        for c in conts:
            seqs.append(ctx + c)
            index.append((r, len(c)))
    logps = _sequence_logprobs(model, seqs, _pad_id(tokenizer), batch_size)
    scores: list[list[float]] = [[] for _ in encoded]
    for (r, n), lp in zip(index, logps, strict=True):
        scores[r].append(lp[len(lp) - n :].sum().item())
    right = sum(
        max(range(len(s)), key=s.__getitem__) == int(rows[r]["answer"])
        for r, s in enumerate(scores)
    )
    return right / len(encoded)


def _perplexity(
    spec: TaskSpec, model, tokenizer, rows: list[dict], encoded: list[list[int]], batch_size: int
) -> float:
    logps = _sequence_logprobs(model, encoded, _pad_id(tokenizer), batch_size)
    total = sum(-lp.double().sum().item() for lp in logps)
    count = sum(len(lp) for lp in logps)
    return math.exp(total / count)


def _generate(
    spec: TaskSpec, model, tokenizer, rows: list[dict], encoded: list[list[int]], batch_size: int
) -> float:
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    right = 0
    for batch in _batches(order, batch_size):
        texts = greedy(model, [encoded[i] for i in batch], spec.max_new_tokens, tokenizer)
        right += sum(
            spec.extract(t) == str(rows[i]["answer"]).strip()
            for t, i in zip(texts, batch, strict=True)
        )
    return right / len(encoded)


def greedy(
    model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, tokenizer: Any
) -> list[str]:
    """Greedy continuations of left-padded prompts with a KV cache, stopping at EOS."""
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, _pad_id(tokenizer)
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        mask[row, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new: list[torch.Tensor] = []
    past = None
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,  # the prompt's other positions' logits: gigabytes at 7B
                **{cache_keyword(model.forward): past},
            )
            logits = out.logits[:, -1].float()
            _check_finite(logits)
            past = output_cache(out)
            del out  # nothing else of the step outlives it
            token = logits.argmax(-1).masked_fill(done, pad)
            new.append(token)
            done |= token == eos
            if done.all():
                break
            ids = token[:, None]
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1
    generated = torch.stack(new, dim=1).tolist()
    texts = []
    for row in generated:
        end = row.index(eos) if eos in row else len(row)
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return texts


_NATIVE = {"generate": _generate, "choice": _choice, "perplexity": _perplexity}
