"""The zoo's proxy tasks: task YAML files and JSONL splits generated from the skills.

Every skill, of either family, is a `generate` task. `add_choice` asks for the sum among four
candidates (`choice`), `text` is the perplexity of plain-text lines, and `add_choice_lm` runs
the same rows as `add_choice` through lm-eval, which lets a test check that both evaluators
agree.
Both splits are drawn from the full range of each skill, distinct from each other, and the
builder excludes every one of their prompts from training. Each genre's pairs come from a
generator seeded by its name, so adding a skill leaves the other skills' rows as they were.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from evomerge.tasks import SPLITS, TaskSpec, save_task
from evomerge.zoo.skills import ALL_SKILLS, Skill, sample_text

Pair = tuple[str, str]
LM_EVAL_DIR = "lm_eval"


def eval_pairs(
    sizes: dict[str, int], skills: dict[str, Skill] = ALL_SKILLS, text: bool = True
) -> dict[str, dict[str, list[Pair]]]:
    """Per skill and split, distinct (prompt, answer) pairs from the skill's full range;
    with `text`, the text genre too, as ("", line) pairs."""
    samplers = {name: (lambda rng, s=skill: s.sample(rng, True)) for name, skill in skills.items()}
    if text:
        samplers["text"] = lambda rng: ("", sample_text(rng))
    out = {}
    for name, sample in samplers.items():
        rng = random.Random(f"evomerge-eval-{name}")
        seen: dict[str, Pair] = {}
        while len(seen) < sum(sizes.values()):
            pair = sample(rng)
            seen.setdefault(pair[0] or pair[1], pair)
        pairs = list(seen.values())
        out[name], start = {}, 0
        for split in SPLITS:
            out[name][split] = pairs[start : start + sizes[split]]
            start += sizes[split]
    return out


def excluded(pairs: dict[str, dict[str, list[Pair]]]) -> frozenset[str]:
    """Every evaluated prompt (or text line): what training must never see."""
    return frozenset(
        p or a for splits in pairs.values() for rows in splits.values() for p, a in rows
    )


def _choices(rng: random.Random, prompt: str, answer: str) -> dict:
    """Four candidate sums: the right one and near misses a weak model confuses with it."""
    right = int(answer)
    wrong = [w for w in (right + 1, right - 1, right + 10, right - 10, right + 11) if w >= 0]
    options = [right, *rng.sample(wrong, 3)]
    rng.shuffle(options)
    return {"prompt": prompt, "choices": [str(o) for o in options], "answer": options.index(right)}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def skill_tasks(
    folder: Path, pairs: dict[str, dict[str, list[Pair]]], skills: dict[str, Skill]
) -> list[TaskSpec]:
    """One `generate` task per skill, its splits written into `folder`."""
    specs: list[TaskSpec] = []
    for name, skill in skills.items():
        splits = {}
        for split, rows in pairs[name].items():
            splits[split] = folder / f"{name}.{split}.jsonl"
            _write_jsonl(splits[split], [{"prompt": p, "answer": a} for p, a in rows])
        longest = max(len(a) for rows in pairs[name].values() for _, a in rows)
        specs.append(
            TaskSpec(
                name=name,
                kind="generate",
                description=skill.description,
                splits=splits,
                max_new_tokens=longest + 1,
            )
        )
    return specs


def write_tasks(folder: Path, pairs: dict[str, dict[str, list[Pair]]], final: Path) -> list[str]:
    """Write every task into `folder` (the zoo's `tasks/`); returns the task names.

    lm-eval reads data files relative to the working directory, so its YAML names them by
    absolute path under `final`, where the folder will live once the build is renamed.
    """
    folder.mkdir(parents=True)
    specs = skill_tasks(folder, pairs, ALL_SKILLS)

    choice_splits = {}
    rng = random.Random("evomerge-add-choice")
    for split, rows in pairs["add"].items():
        choice_splits[split] = folder / f"add_choice.{split}.jsonl"
        _write_jsonl(choice_splits[split], [_choices(rng, p, a) for p, a in rows])
    specs.append(
        TaskSpec(
            name="add_choice",
            kind="choice",
            description="pick the sum among four candidates by log-likelihood",
            splits=choice_splits,
        )
    )

    text_splits = {}
    for split, rows in pairs["text"].items():
        text_splits[split] = folder / f"text.{split}.jsonl"
        _write_jsonl(text_splits[split], [{"text": a} for _, a in rows])
    specs.append(
        TaskSpec(
            name="text",
            kind="perplexity",
            description="perplexity of plain-text lines",
            splits=text_splits,
        )
    )

    lm_dir = folder / LM_EVAL_DIR
    lm_dir.mkdir()
    for split in SPLITS:
        config = {
            "task": f"evomerge_add_choice_{split}",
            "dataset_path": "json",
            "dataset_kwargs": {
                "data_files": {"test": str(final / folder.name / f"add_choice.{split}.jsonl")}
            },
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "prompt",
            "doc_to_choice": "choices",
            "doc_to_target": "answer",
            "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
        (lm_dir / f"add_choice_{split}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    specs.append(
        TaskSpec(
            name="add_choice_lm",
            kind="lm_eval",
            description="add_choice through lm-eval-harness (HFLM on the in-memory model)",
            lm_eval_task="evomerge_add_choice_{split}",
            include_path=lm_dir,
            metric="acc",
        )
    )
    for spec in specs:
        save_task(spec, folder / f"{spec.name}.yaml")
    return [s.name for s in specs]
