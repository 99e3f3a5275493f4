"""The cross-skill zoo (issue 18): a skill that no source has, for a merge to find.

The paper's headline is a merge that does what none of its sources can: math asked in
Japanese, from a Japanese model and English math models. This zoo is that in miniature, in
8-layer models, deep enough for a route through the layers of two models to matter:

- The foreign language writes each digit as a letter (`NUMERALS`: 47 is "lq").
- `base` pretrains from scratch on three skills on their partial ranges: `add` on digits
  0-6, `numerals` (read a number written partly in letters: digits copy, the letters for
  0-6 translate) and `foreign_add` (`add` asked code-switched, each digit a letter or not).
  So the base has both skills and the circuit that joins them, on part of their range, as
  the demo zoo learned a base must; it has never seen the letters for 7, 8 and 9.
- `lang` learns those three letters: it fine-tunes only the embeddings, on `numerals`'
  full range. Through the frozen layers, the cheapest way to make the letter for 7 read as
  7 is an embedding like the digit 7's, the one input those layers already read as 7.
- `math` fine-tunes every parameter on `add`'s full range: it adds with 7-9, in digits.
- The task is `foreign_add` on its full range, every digit a letter, scored as MGSM is
  (exact match of the answer). Base, `lang` and `math` each fail wherever a 7, 8 or 9
  appears, so each scores about the share of questions without one (0.4); a merge that
  takes `lang`'s letters and `math`'s sums answers the rest.

Why `lang` trains only its embeddings: measured, experts that fine-tuned every parameter did
not compose on any variant tried (worked answers, code-switching, carries as the math
skill; docs/benchmarks.md lists them): each learned its new symbols in a representation of
its own, and task arithmetic of the two scored no better than either. Whole-model
fine-tunes that meet in the base's representation are what this zoo needs, and a vocabulary
fine-tune (as language adaptation of LLMs often is) gives that by construction, while the
weights of a merge still matter (see the docs' table: too little of `lang` and the letters
stay unread, too much and every embedding drifts).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from evomerge.tasks import save_task
from evomerge.zoo.skills import CROSS_SKILLS
from evomerge.zoo.taskdata import eval_pairs, excluded, skill_tasks
from evomerge.zoo.train import Job, Shape, replay_mix, run_job

TASK = "foreign_add"
# Expert → (the skill it extends, the decoder layers it fine-tunes: (0, 0) is the embeddings
# alone, None every parameter).
EXPERTS: dict[str, tuple[str, tuple[int, int] | None]] = {
    "lang": ("numerals", (0, 0)),
    "math": ("add", None),
}


@dataclass(frozen=True)
class CrossRecipe:
    """Everything the cross-skill zoo depends on."""

    shape: Shape = field(default_factory=lambda: Shape(layers=8))
    base_steps: int = 1000
    base_lr: float = 2e-3
    expert_steps: int = 300
    expert_lr: float = 4e-4
    replay: float = 0.5
    search_rows: int = 64
    held_out_rows: int = 256
    seed: int = 0


def jobs(recipe: CrossRecipe) -> tuple[Job, list[Job]]:
    """The base's job and its experts' jobs."""
    broad = dict.fromkeys(CROSS_SKILLS, 1.0)
    base = Job(
        "base",
        recipe.base_steps,
        recipe.base_lr,
        broad,
        seed=recipe.seed + 400,
        warmup=100,
        weight_decay=0.1,
        shape=recipe.shape,
        threads=2,  # it trains alone: the experts start from it
    )
    experts = []
    for i, (name, (skill, layers)) in enumerate(EXPERTS.items()):
        experts.append(
            replace(
                base,
                name=name,
                steps=recipe.expert_steps,
                lr=recipe.expert_lr,
                mix=replay_mix(broad, skill, recipe.replay),
                seed=recipe.seed + 500 + i,
                full=(skill,),
                warmup=30,
                weight_decay=0.0,
                threads=1,
                layers=layers,
            )
        )
    return base, experts


def build_cross(
    recipe: CrossRecipe, tmp: Path, say: Callable[[str], None], progress: bool
) -> dict[str, Any]:
    """Train the cross-skill zoo into `tmp`; returns its manifest (without scores)."""
    sizes = {"search": recipe.search_rows, "held-out": recipe.held_out_rows}
    pairs = eval_pairs(sizes, CROSS_SKILLS, text=False)
    exclude = excluded(pairs)
    (tmp / "tasks").mkdir(parents=True)
    specs = skill_tasks(tmp / "tasks", pairs, CROSS_SKILLS)
    for spec in specs:
        save_task(spec, tmp / "tasks" / f"{spec.name}.yaml")
    base, experts = jobs(recipe)
    with mp.get_context("spawn").Pool(2) as pool:
        say(f"training base ({base.steps} steps, {recipe.shape.layers} layers)")
        seconds = dict([pool.apply(run_job, ((base, tmp / base.name, None, exclude, progress),))])
        say(f"training {', '.join(j.name for j in experts)} ({recipe.expert_steps} steps each)")
        args = [(j, tmp / j.name, tmp / base.name, exclude, progress) for j in experts]
        seconds.update(pool.map(run_job, args))
    return {
        "base": base.name,
        "experts": {name: skill for name, (skill, _) in EXPERTS.items()},
        "task": TASK,
        "tasks": [s.name for s in specs],
        "train_seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
