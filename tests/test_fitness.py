"""The evaluator on real zoo models: every task kind, lm-eval agreement, determinism, the
batched decoding it relies on for speed, NaN, and the errors it must raise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.fitness import Evaluator, greedy
from evomerge.tasks import load_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def every_kind(zoo_dir: Path) -> Evaluator:
    """One evaluator over the four kinds (lm-eval's task index takes ~15 s to build once)."""
    tasks = ["zoo:add", "zoo:add_choice", "zoo:add_choice_lm", "zoo:text"]
    return Evaluator(tasks, split="held-out", zoo_dir=zoo_dir)


def load(zoo_dir: Path, name: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(zoo_dir / name)


def test_generate_exact_match_separates_expert_from_base(zoo_dir: Path, tokenizer) -> None:
    evaluator = Evaluator(["zoo:reverse"], split="search", zoo_dir=zoo_dir)
    expert = evaluator.score(load(zoo_dir, "reverse"), tokenizer)
    base = evaluator.score(load(zoo_dir, "base"), tokenizer)
    assert expert.metrics["reverse"] >= 0.85 and base.metrics["reverse"] <= 0.6
    assert expert.fitness == expert.metrics["reverse"]


def test_batched_greedy_equals_one_by_one_and_hf_generate(zoo_dir: Path, tokenizer) -> None:
    """Left padding, positions and the KV cache must not change a single token."""
    model = load(zoo_dir, "translate")
    prompts = ["7+5=", "QWERTY>", "cat sun fire:", "ABC>", "king:", "61+48="]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    batched = greedy(model, ids, 16, tokenizer)
    assert batched == [greedy(model, [i], 16, tokenizer)[0] for i in ids]
    for i, text in zip(ids, batched, strict=True):
        out = model.generate(torch.tensor([i]), max_new_tokens=16, do_sample=False)
        assert tokenizer.decode(out[0, len(i) :], skip_special_tokens=True) == text


def test_choice_equals_lm_eval_acc_on_the_same_rows(every_kind: Evaluator, zoo_dir, tokenizer):
    for name in ("base", "add"):
        metrics = every_kind.score(load(zoo_dir, name), tokenizer).metrics
        assert metrics["add_choice"] == metrics["add_choice_lm"], (name, metrics)
    assert metrics["add_choice"] >= 0.9


def test_perplexity_is_exp_of_mean_token_loss(zoo_dir: Path, tokenizer) -> None:
    spec = load_task("zoo:text", zoo_dir)
    evaluator = Evaluator([spec], split="search", limit=20)
    model = load(zoo_dir, "base")
    score = evaluator.score(model, tokenizer)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in spec.rows("search", limit=20):
            ids = torch.tensor([tokenizer(row["text"])["input_ids"]])
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert score.metrics["text"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert 1 < score.metrics["text"] < 10
    assert score.fitness == pytest.approx(1 / score.metrics["text"])


def test_fitness_is_the_weighted_mean_oriented_higher_is_better(zoo_dir, tokenizer) -> None:
    tasks = ["zoo:add", "zoo:reverse", "zoo:text"]
    evaluator = Evaluator(tasks, weights=[2, 1, 1], limit=32, zoo_dir=zoo_dir)
    s = evaluator.score(load(zoo_dir, "add"), tokenizer)
    expected = (2 * s.metrics["add"] + s.metrics["reverse"] + 1 / s.metrics["text"]) / 4
    assert s.fitness == pytest.approx(expected)
    assert set(s.task_seconds) == {"add", "reverse", "text"} and s.seconds > 0


def test_same_model_scores_the_same_twice(every_kind: Evaluator, zoo_dir, tokenizer) -> None:
    model = load(zoo_dir, "reverse")
    first, second = every_kind.score(model, tokenizer), every_kind.score(model, tokenizer)
    assert first.metrics == second.metrics and first.fitness == second.fitness
    fresh = Evaluator(["zoo:add", "zoo:text"], split="held-out", zoo_dir=zoo_dir)
    again = fresh.score(load(zoo_dir, "reverse"), AutoTokenizer.from_pretrained(zoo_dir / "base"))
    assert again.metrics == {k: first.metrics[k] for k in ("add", "text")}


def test_non_finite_logits_give_nan_not_a_bad_score(every_kind, zoo_dir, tokenizer) -> None:
    model = load(zoo_dir, "add")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    score = every_kind.score(model, tokenizer)
    assert all(math.isnan(v) for v in score.metrics.values()), score.metrics
    assert math.isnan(score.fitness)


def test_text_the_tokenizer_cannot_encode_is_an_error(tmp_path: Path, zoo_dir, tokenizer):
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": "what is 2+2?", "answer": "4"}) + "\n")
    (tmp_path / "q.yaml").write_text("name: q\nkind: generate\nsplits: {search: q.jsonl}\n")
    with pytest.raises(ValueError, match=r"task 'q'.*cannot encode 'what is 2\+2\?'"):
        Evaluator([str(tmp_path / "q.yaml")], tokenizer=tokenizer)
    evaluator = Evaluator([str(tmp_path / "q.yaml")])
    with pytest.raises(ValueError, match="cannot encode"):
        evaluator.score(load(zoo_dir, "base"), tokenizer)


def test_evaluator_argument_errors(zoo_dir: Path) -> None:
    with pytest.raises(ValueError, match="2 weights for 1 tasks"):
        Evaluator(["zoo:add"], weights=[1, 1], zoo_dir=zoo_dir)
    with pytest.raises(ValueError, match="repeat"):
        Evaluator(["zoo:add", "zoo:add"], zoo_dir=zoo_dir)
    with pytest.raises(KeyError, match="no split 'dev'"):
        Evaluator(["zoo:add"], split="dev", zoo_dir=zoo_dir)
    with pytest.raises(FileNotFoundError, match="missing"):
        Evaluator(["zoo:missing"], zoo_dir=zoo_dir)
    assert len(Evaluator(["zoo:add"], limit=7, zoo_dir=zoo_dir).rows["add"]) == 7
