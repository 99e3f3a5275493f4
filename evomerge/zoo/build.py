"""Build the toy zoo: a base, one expert per skill fine-tuned from it, and a stranger.

The base pretrains on every skill's *partial* range plus plain text, so each expert only
extends a circuit the base already has (small, mergeable task vectors); experts fine-tune
gently (lr 3e-4, answer tokens only, 30% replay of the base mix). The stranger has the same
shape and vocabulary but its own initialisation, so its weights do not align with the others.
The zoo is cached under a folder named by a hash of this recipe, built in a temporary folder
and renamed, so an interrupted build never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import random
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import yaml
from platformdirs import user_cache_dir

from evomerge.zoo.skills import SKILLS
from evomerge.zoo.train import TEXT, Job, train

Size = Literal["demo", "test"]
SPLITS = {"search": 200, "held-out": 200}
EXPERTS = ("add", "reverse", "translate")


def jobs(size: Size) -> tuple[Job, list[Job], Job]:
    """The zoo recipe: (base, experts, stranger) training jobs for a size."""
    base_steps, expert_steps = (1500, 300) if size == "demo" else (500, 150)
    broad = {**dict.fromkeys(SKILLS, 1.0), TEXT: 0.5}
    total = sum(broad.values())
    base = Job("base", base_steps, 3e-3, broad, seed=0)
    experts = []
    for i, skill in enumerate(EXPERTS):
        mix = {k: 0.3 * v / total for k, v in broad.items()}
        mix[skill] += 0.7
        experts.append(
            Job(
                skill,
                expert_steps,
                3e-4,
                mix,
                seed=100 + i,
                full=(skill,),
                answer_only=True,
                warmup=30,
            )
        )
    stranger = Job("stranger", base_steps // 3, 3e-3, broad, seed=999)
    return base, experts, stranger


def recipe_hash(size: Size) -> str:
    base, experts, stranger = jobs(size)
    text = json.dumps(
        [asdict(j) for j in (base, *experts, stranger)], sort_keys=True, default=str
    ) + json.dumps(SPLITS)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_zoo_dir(size: Size = "demo") -> Path:
    return Path(user_cache_dir("evomerge")) / "zoo" / f"{size}-{recipe_hash(size)}"


def resolve_model(ref: str, zoo_dir: Path | None = None) -> Path:
    """`zoo:NAME` → that model folder of the zoo; anything else is a checkpoint folder."""
    if ref.startswith("zoo:"):
        path = (zoo_dir or default_zoo_dir("demo")) / ref[4:]
    else:
        path = Path(ref).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder not found (no config.json): {path} (from {ref!r})")
    return path


def eval_prompts(size: Size) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """Per skill and split, distinct (prompt, answer) pairs from the skill's full range."""
    out: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for name, skill in SKILLS.items():
        rng = random.Random(f"eval-{name}")
        seen: dict[str, str] = {}
        while len(seen) < sum(SPLITS.values()):
            p, a = skill.sample(rng, True)
            seen.setdefault(p, a)
        pairs = list(seen.items())
        out[name] = {"search": pairs[: SPLITS["search"]], "held-out": pairs[SPLITS["search"] :]}
    return out


def _write_tasks(root: Path, prompts: dict) -> None:
    tasks = root / "tasks"
    tasks.mkdir()
    for name, splits in prompts.items():
        files = {}
        for split, pairs in splits.items():
            f = tasks / f"{name}.{split}.jsonl"
            f.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs))
            files[split] = f.name
        spec = {
            "name": name,
            "kind": "generate",
            "description": SKILLS[name].description,
            "splits": files,
            "max_new_tokens": 16,
        }
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def _train_expert(args: tuple[Job, Path, Path, frozenset]) -> float:
    job, out, parent, exclude = args
    return train(job, out, parent=parent, exclude=exclude)


def build_zoo(size: Size = "demo", out: Path | None = None, progress: bool = True) -> Path:
    """Train (or reuse) the zoo and return its folder."""
    root = Path(out) if out else default_zoo_dir(size)
    if (root / "zoo.json").is_file():
        return root
    say = print if progress else (lambda *_: None)
    base, experts, stranger = jobs(size)
    prompts = eval_prompts(size)
    exclude = frozenset(
        p for splits in prompts.values() for pairs in splits.values() for p, _ in pairs
    )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        t0 = time.perf_counter()
        ctx = mp.get_context("spawn")
        with ctx.Pool(2) as pool:
            stranger_run = pool.apply_async(
                _train_expert, ((stranger, tmp / "stranger", None, exclude),)
            )
            say(f"training base ({base.steps} steps) and stranger ({stranger.steps} steps)")
            train(base, tmp / "base", exclude=exclude)
            stranger_run.get()
            say(f"training {len(experts)} experts ({experts[0].steps} steps each)")
            pool.map(_train_expert, [(j, tmp / j.name, tmp / "base", exclude) for j in experts])
        _write_tasks(tmp, prompts)
        manifest = {
            "size": size,
            "version": recipe_hash(size),
            "base": "base",
            "experts": {j.name: j.name for j in experts},
            "stranger": "stranger",
            "tasks": sorted(SKILLS),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2))
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"zoo built in {manifest['seconds']} s: {root}")
    return root
