"""The toy zoo: what it contains, that it loads offline, that its experts are real and
mergeable, and that building is cached, versioned, deterministic and crash-safe."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.fitness import Evaluator
from evomerge.glue.kinship import analyse
from evomerge.tasks import load_task
from evomerge.zoo import build as zoo_build
from evomerge.zoo import build_zoo, default_zoo_dir, read_manifest, resolve_model
from evomerge.zoo.skills import ALL_SKILLS, SKILLS, STRANGER_SKILLS
from evomerge.zoo.taskdata import eval_pairs, excluded
from evomerge.zoo.tokenizer import UNK_ID, VOCAB, build_tokenizer, encode
from evomerge.zoo.train import Job, Shape, make_batch, train

MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


def skills_mean(row: dict[str, float], skills: list[str]) -> float:
    return sum(row[s] for s in skills) / len(skills)


def test_manifest_and_layout(zoo_dir: Path) -> None:
    manifest = read_manifest(zoo_dir)
    assert manifest["size"] == "test" and manifest["version"] == zoo_build.version("test")
    assert zoo_dir == default_zoo_dir("test") and manifest["version"] in zoo_dir.name
    assert set(manifest["experts"].values()) == set(SKILLS) and len(manifest["experts"]) >= 3
    assert manifest["stranger_experts"] == {"stranger-upper": "upper"}
    assert set(manifest["stranger_experts"].values()) == set(STRANGER_SKILLS)
    assert set(ALL_SKILLS) <= set(manifest["tasks"])
    for name in zoo_build.model_names(manifest):
        assert all((zoo_dir / name / f).is_file() for f in MODEL_FILES), name
    kinds = set()
    for task in manifest["tasks"]:
        spec = load_task(f"zoo:{task}", zoo_dir)
        kinds.add(spec.kind)
        if spec.kind != "lm_eval":
            assert {s: p.is_file() for s, p in spec.splits.items()} == {
                "search": True,
                "held-out": True,
            }
    assert kinds == {"generate", "choice", "perplexity", "lm_eval"}


def test_models_load_offline_through_transformers(zoo_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manifest = read_manifest(zoo_dir)
    configs, vocabs = [], []
    for name in zoo_build.model_names(manifest):
        model = AutoModelForCausalLM.from_pretrained(zoo_dir / name)
        tokenizer = AutoTokenizer.from_pretrained(zoo_dir / name)
        assert isinstance(model, LlamaForCausalLM)
        configs.append({k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"})
        vocabs.append(tokenizer.get_vocab())
        ids = tokenizer("12+34=")["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == "12+34="
        out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
        assert out.shape[1] > len(ids)
    assert all(c == configs[0] for c in configs) and all(v == vocabs[0] for v in vocabs)
    assert 0.1e6 < sum(p.numel() for p in model.parameters()) < 2e6


def test_tokenizer_is_character_level_and_flags_unknown_text() -> None:
    tok = build_tokenizer()
    text = "QWE> cat sun: 12+7="
    assert tok(text)["input_ids"] == [tok.bos_token_id, *encode(text)]
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert UNK_ID in tok("é?")["input_ids"]


def test_experts_beat_base_and_stranger_on_their_skill(zoo_dir: Path) -> None:
    """Test size floors; the demo floors (0.9) are checked by the slow demo test."""
    manifest = read_manifest(zoo_dir)
    table = manifest["held_out"]
    for expert, skill in manifest["experts"].items():
        assert table[expert][skill] >= 0.85, (expert, table[expert])
        assert table[expert][skill] - table["base"][skill] >= 0.4, (skill, table)
        assert table["stranger"][skill] <= table["base"][skill] + 0.05, (skill, table)


def test_manifest_table_is_reproduced_by_the_evaluator(zoo_dir: Path) -> None:
    """The build's scores came from the same deterministic evaluator, in another process."""
    manifest = read_manifest(zoo_dir)
    evaluator = Evaluator([f"zoo:{s}" for s in ALL_SKILLS], split="held-out", zoo_dir=zoo_dir)
    for name in ("add", "stranger-upper"):
        model = AutoModelForCausalLM.from_pretrained(zoo_dir / name)
        score = evaluator.score(model, AutoTokenizer.from_pretrained(zoo_dir / name))
        expected = {s: manifest["held_out"][name][s] for s in ALL_SKILLS}
        assert score.metrics == pytest.approx(expected, abs=5e-5), name  # rounded to 4 places


def test_task_arithmetic_of_the_experts_beats_every_model(zoo_dir: Path) -> None:
    """The claim the whole project rests on: merging the experts beats each of them."""
    manifest = read_manifest(zoo_dir)
    skills = list(manifest["experts"].values())
    table = manifest["held_out"]
    merged = zoo_build.hand_merge(zoo_dir)
    evaluator = Evaluator([f"zoo:{s}" for s in skills], split="held-out", zoo_dir=zoo_dir)
    score = evaluator.score(merged, AutoTokenizer.from_pretrained(zoo_dir / "base"))
    best_single = max(skills_mean(row, skills) for row in table.values())
    assert score.fitness > best_single + 0.1, (score.metrics, table)
    for expert, skill in manifest["experts"].items():
        kept = (score.metrics[skill] - table["base"][skill]) / (
            table[expert][skill] - table["base"][skill]
        )
        # The zoo is designed to keep 30% (benchmarks/zoo_build.py), but float rounding differs
        # between CPUs and so do the trained weights: one machine kept 41% of the add expert's
        # gain, two others 25% and 29% (docs/benchmarks.md). The test asserts what holds on all.
        assert kept > 0.2, (skill, score.metrics)


def test_harmful_model_lowers_the_merge_it_joins(zoo_dir: Path) -> None:
    """Model-GLUE's harmful model: worse than the base alone, and the experts' merge drops
    on every skill's mean when it joins."""
    manifest = read_manifest(zoo_dir)
    skills, table = list(manifest["experts"].values()), manifest["held_out"]
    assert skills_mean(table["harmful"], skills) < skills_mean(table["base"], skills) - 0.1
    evaluator = Evaluator([f"zoo:{s}" for s in skills], split="held-out", zoo_dir=zoo_dir)
    tokenizer = AutoTokenizer.from_pretrained(zoo_dir / "base")
    experts = list(manifest["experts"])
    without = evaluator.score(zoo_build.hand_merge(zoo_dir, models=experts), tokenizer)
    joined = zoo_build.hand_merge(zoo_dir, models=[*experts, "harmful"])
    assert evaluator.score(joined, tokenizer).fitness < without.fitness - 0.1


def test_analysis_clusters_the_two_families(zoo_dir: Path) -> None:
    """Model-GLUE's clustering on the zoo: the harmful fine-tune is family (mergeable, for the
    selection to drop); the stranger and its expert form a second family, which the
    stranger's initialisation keeps apart from the first."""
    manifest = read_manifest(zoo_dir)
    names = zoo_build.model_names(manifest)
    second = (manifest["stranger"], *manifest["stranger_experts"])
    result = analyse({n: zoo_dir / n for n in names})
    assert result.clusters == (tuple(n for n in names if n not in second), second)
    assert result.apart() == {}
    assert result.similarity("stranger", "stranger-upper") > 0.95
    assert all(abs(result.similarity(a, b)) < 0.2 for a in names for b in second if a not in second)
    alone = analyse({n: zoo_dir / n for n in names if n != "stranger-upper"})
    assert "another initialisation" in alone.apart()["stranger"]


def test_stranger_expert_brings_a_skill_the_first_family_lacks(zoo_dir: Path) -> None:
    """The second family's reason to be mixed in: its expert's skill, which no model of the
    first family has; and it keeps the stranger's weak skills."""
    manifest = read_manifest(zoo_dir)
    table = manifest["held_out"]
    first = [manifest["base"], *manifest["experts"], manifest["harmful"]]
    for expert, skill in manifest["stranger_experts"].items():
        assert table[expert][skill] >= 0.85, (expert, table[expert])
        assert max(table[m][skill] for m in [*first, "stranger"]) <= 0.05, (skill, table)
        for other in SKILLS:
            assert table[expert][other] >= table["stranger"][other] - 0.1, (other, table)
    base, stranger, stranger_tuned, tuned = zoo_build.jobs(zoo_build.recipe_of("test"))
    assert all(set(j.mix) <= {*SKILLS, "text"} for j in (base, stranger, *tuned))
    assert [j.name for j in stranger_tuned] == list(manifest["stranger_experts"])


def test_stranger_weights_do_not_align_with_the_family(zoo_dir: Path) -> None:
    def flat(name: str) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(zoo_dir / name)
        return torch.cat([p.flatten() for p in model.parameters() if p.dim() == 2])

    base = flat("base")
    cos = torch.nn.functional.cosine_similarity
    assert cos(base, flat("add"), dim=0) > 0.9
    assert abs(cos(base, flat("stranger"), dim=0)) < 0.2


def test_evaluated_prompts_are_never_trained_on() -> None:
    pairs = eval_pairs({"search": 50, "held-out": 50})
    for name, splits in pairs.items():
        search = {p or a for p, a in splits["search"]}
        held = {p or a for p, a in splits["held-out"]}
        assert len(search) == len(held) == 50 and not search & held, name
    banned = excluded(pairs)
    mix = {**dict.fromkeys(ALL_SKILLS, 1.0), "text": 1.0}
    job = Job("x", 1, 1e-3, mix, 0, full=tuple(ALL_SKILLS))
    chars = {i: c for c, i in VOCAB.items()}

    def drawn(exclude: frozenset[str]) -> set[str]:
        """The prompts (or text lines) of 300 batches."""
        rng, out = random.Random(0), set()
        for _ in range(300):
            for ids, labels in make_batch(job, rng, exclude):
                first = next(i for i, y in enumerate(labels) if y != -100)
                out.add("".join(chars[i] for i in ids[1 : first if first > 1 else -1]))
        return out

    assert drawn(frozenset()) & banned  # 1-2 digit sums repeat: the filter is needed
    assert not drawn(banned) & banned


def test_training_is_deterministic(tmp_path: Path) -> None:
    job = Job("tiny", 3, 1e-3, {"add": 1.0, "text": 1.0}, seed=5, shape=Shape(32, 2, 2, 64))
    for out in ("a", "b"):
        train(job, tmp_path / out)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cached_zoo_is_reused_and_versioned(zoo_dir: Path, monkeypatch) -> None:
    before = (zoo_dir / "zoo.json").stat().st_mtime_ns
    assert build_zoo("test", progress=False) == zoo_dir
    assert (zoo_dir / "zoo.json").stat().st_mtime_ns == before
    changed = dataclasses.replace(zoo_build.RECIPES["test"], expert_steps=1)
    monkeypatch.setitem(zoo_build.RECIPES, "test", changed)
    assert default_zoo_dir("test") != zoo_dir


def test_zoo_cache_key_holds_what_changes_the_weights(zoo_dir: Path, monkeypatch) -> None:
    """Another seed or another torch/transformers trains other weights: another folder."""
    import transformers

    assert default_zoo_dir("test", seed=1) != zoo_dir
    assert zoo_build.recipe_of("test", seed=1).seed == 1
    for module in (torch, transformers):
        with monkeypatch.context() as patch:
            patch.setattr(module, "__version__", module.__version__ + ".other")
            assert default_zoo_dir("test") != zoo_dir, module.__name__
    assert default_zoo_dir("test") == zoo_dir


def test_interrupted_build_leaves_no_zoo(tmp_path: Path, monkeypatch) -> None:
    def crash(size, seed, tmp, final, progress):
        (tmp / "base").mkdir()
        (tmp / "zoo.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo_build, "_build", crash)
    out = tmp_path / "zoo"
    with pytest.raises(KeyboardInterrupt):
        build_zoo("test", out=out, progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".zoo.lock"]
    (tmp_path / ".zoo.building-killed").mkdir()  # what SIGKILL leaves: cleaned by the next
    monkeypatch.setattr(zoo_build, "_build", crash)
    with pytest.raises(KeyboardInterrupt):
        build_zoo("test", out=out, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [".zoo.lock"]


def test_build_refuses_a_folder_that_is_not_a_zoo(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a zoo"):
        build_zoo("test", out=tmp_path, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_resolve_model(zoo_dir: Path, tmp_path: Path) -> None:
    assert resolve_model("zoo:add", zoo_dir) == zoo_dir / "add"
    assert resolve_model(str(zoo_dir / "base")) == zoo_dir / "base"
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_model("zoo:nope", zoo_dir)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing"))):
        resolve_model(str(tmp_path / "missing"))


def test_cli_zoo_build_prints_the_table(zoo_dir: Path) -> None:
    result = CliRunner().invoke(app, ["zoo", "build", "--size", "test", "--quiet"])
    assert result.exit_code == 0, result.output
    for name in ("base", "stranger", "stranger-upper", *ALL_SKILLS, "skills mean"):
        assert name in result.output


def test_cli_eval_json_and_errors(zoo_dir: Path) -> None:
    runner = CliRunner()
    args = ["eval", "zoo:base", "zoo:add", "--task", "zoo:add", "--zoo", "test"]
    result = runner.invoke(app, [*args, "--split", "held-out", "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    table = read_manifest(zoo_dir)["held_out"]
    assert scores["zoo:add"]["metrics"]["add"] == pytest.approx(table["add"]["add"], abs=5e-5)
    assert scores["zoo:base"]["fitness"] == pytest.approx(table["base"]["add"], abs=5e-5)
    missing = runner.invoke(app, ["eval", "zoo:nope", "--task", "zoo:add", "--zoo", "test"])
    assert missing.exit_code == 2 and "nope" in missing.output


@pytest.mark.slow
@pytest.mark.demo_zoo
def test_demo_zoo_meets_its_floors(tmp_path: Path) -> None:
    """The demo zoo (about 6 minutes on 2 cores): the numbers the README promises."""
    root = build_zoo("demo", progress=False)
    manifest = read_manifest(root)
    table, skills = manifest["held_out"], list(manifest["experts"].values())
    for expert, skill in manifest["experts"].items():
        assert table[expert][skill] >= 0.9, (expert, table[expert])
        assert table[expert][skill] - table["base"][skill] >= 0.4
        assert table["stranger"][skill] <= 0.5
    first = [manifest["base"], *manifest["experts"], manifest["harmful"]]
    for expert, skill in manifest["stranger_experts"].items():
        assert table[expert][skill] >= 0.85, (expert, table[expert])
        assert max(table[m][skill] for m in first) <= 0.05, (skill, table)
    merged = zoo_build.hand_merge(root)
    evaluator = Evaluator([f"zoo:{s}" for s in skills], split="held-out", zoo_dir=root)
    score = evaluator.score(merged, AutoTokenizer.from_pretrained(root / "base"))
    assert score.fitness > max(skills_mean(row, skills) for row in table.values()) + 0.1
