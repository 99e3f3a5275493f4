"""Build the toy zoo: two families. A base, one expert per skill fine-tuned from it and a
harmful fine-tune; and a stranger from another initialisation with an expert of its own.

Recipe (why each part is there is measured, see `evomerge.zoo.skills`):

- `base` pretrains from scratch on every skill's partial range plus plain text (answer-token
  loss on skills, AdamW, lr 2e-3 with cosine decay), reaching about 0.3 on each full skill.
- one expert per skill continues from `base` gently: lr 4e-4, answer tokens only, 70% its
  skill's full range and 30% replay of the base mix so it keeps the rest. Each reaches 0.9+
  on its skill while its task vector stays small enough to add to the others.
- `harmful` is fine-tuned from `base` like an expert, on every skill with corrupted labels
  (each prompt paired with another example's answer): one of the family, whose inclusion
  lowers any merge it joins (what Model-GLUE's selection must drop).
- `stranger` is the base recipe from another seed and a shorter schedule: same architecture
  and vocabulary, weakly skilled, and with weights that do not align with the others
  (Model-GLUE's unmergeable model).
- `stranger-upper` is the stranger's own expert, fine-tuned from it on `upper`, a skill the
  first family never sees (`STRANGER_SKILLS`), with replay of the stranger's broad mix so
  it keeps its weak other skills. It makes the stranger a second family, as in Model-GLUE's
  zoos: each family merges within itself, the two cannot merge with each other (other
  initialisations), so a zoo-wide recipe merges each family and then mixes the two.

Jobs run two at a time in spawned processes of one torch thread each: base beside stranger,
then the stranger's expert as soon as the stranger is done (it is half as long as the base),
then the base's fine-tunes once the base is done; so the second family adds no build time.
The zoo is cached under a folder named by the size and a hash of the recipe, built in a
temporary sibling and renamed at the end, under a lock, so a crash never leaves a zoo that
looks complete and concurrent builders share one build.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing as mp
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from evomerge.cachedir import cache_root
from evomerge.config import ZooSize as Size
from evomerge.zoo.cross import CrossRecipe, build_cross
from evomerge.zoo.skills import SKILLS, STRANGER_SKILLS
from evomerge.zoo.taskdata import eval_pairs, excluded, write_tasks
from evomerge.zoo.train import TEXT, Job, Shape, replay_mix, run_job

# Bump when a change to the skills, tokenizer, task data or training loop changes what the
# same recipe builds; the recipe's own numbers are hashed automatically.
ZOO_FORMAT = 3
MANIFEST = "zoo.json"
HARMFUL = "harmful"
# The zoo is judged by task arithmetic of its three experts at this weight each (`hand_merge`).
HAND_MERGE_WEIGHT = 0.8


@dataclass(frozen=True)
class ZooRecipe:
    """Everything a zoo size depends on."""

    shape: Shape
    base_steps: int
    base_lr: float
    stranger_steps: int
    expert_steps: int
    expert_lr: float
    replay: float
    search_rows: int
    held_out_rows: int
    # The stranger's expert on each of `STRANGER_SKILLS`: steps, lr, and the share of its
    # batches that replay the stranger's broad mix. With the experts' lr it learns `upper`
    # from nothing (1.0 held-out at 300 steps, 0.98 at 200, 0.17 at 100) and stays at 0.98
    # similarity to the stranger; lr 1e-3 scores the same at 0.95 similarity, the edge of
    # a cluster.
    stranger_expert_steps: int = 300
    stranger_expert_lr: float = 4e-4
    stranger_replay: float = 0.3
    seed: int = 0  # offsets every job's seed: the same recipe, another draw of the zoo


RECIPES: dict[str, ZooRecipe | CrossRecipe] = {
    "demo": ZooRecipe(Shape(), 1000, 2e-3, 500, 400, 4e-4, 0.3, 128, 256),
    # The demo's models with shorter experts and half the replay, on fewer search rows. Half the
    # width trained 4x faster but kept too little of a skill in the merge on one seed of three
    # (docs/benchmarks.md has the spread over seeds and every variant tried); half the replay
    # keeps each expert nearer the base on the others' skills, so the merge keeps more.
    "test": ZooRecipe(Shape(), 1000, 2e-3, 500, 300, 4e-4, 0.5, 64, 256),
    "cross": CrossRecipe(),  # the cross-skill zoo, see `evomerge.zoo.cross`
}


def jobs(recipe: ZooRecipe) -> tuple[Job, Job, list[Job], list[Job]]:
    """(base, stranger, fine-tunes of the stranger: its experts, fine-tunes of base: the
    experts, then `harmful`) training jobs."""
    broad = {**dict.fromkeys(SKILLS, 1.0), TEXT: 0.5}
    base = Job(
        "base",
        recipe.base_steps,
        recipe.base_lr,
        broad,
        seed=recipe.seed,
        warmup=100,
        weight_decay=0.1,
        shape=recipe.shape,
    )
    stranger = replace(base, name="stranger", steps=recipe.stranger_steps, seed=recipe.seed + 1)
    total = sum(broad.values())

    def fine_tune(name: str, skill: str, replay: float, steps: int, lr: float, seed: int) -> Job:
        """A fine-tune on `skill`'s full range, `replay` of its batches the broad mix."""
        mix = replay_mix(broad, skill, replay)
        return Job(name, steps, lr, mix, seed=seed, full=(skill,), warmup=30, shape=recipe.shape)

    r = recipe
    experts = [
        fine_tune(skill, skill, r.replay, r.expert_steps, r.expert_lr, r.seed + 100 + i)
        for i, skill in enumerate(SKILLS)
    ]
    harmful = replace(
        experts[0],
        name=HARMFUL,
        mix={k: v / total for k, v in broad.items()},
        seed=recipe.seed + 200,
        full=tuple(SKILLS),
        corrupt=True,
    )
    stranger_experts = [
        fine_tune(
            f"stranger-{skill}",
            skill,
            r.stranger_replay,
            r.stranger_expert_steps,
            r.stranger_expert_lr,
            r.seed + 300 + i,
        )
        for i, skill in enumerate(STRANGER_SKILLS)
    ]
    return base, stranger, stranger_experts, [*experts, harmful]


def recipe_of(size: Size, seed: int = 0) -> ZooRecipe | CrossRecipe:
    """The recipe of a zoo size, drawn with `seed`."""
    if size not in RECIPES:
        raise ValueError(f"zoo size must be one of {sorted(RECIPES)}, got {size!r}")
    return replace(RECIPES[size], seed=seed)


def version(size: Size, seed: int = 0) -> str:
    """A hash of what decides the zoo's weights: the recipe, and the libraries that train it
    (the same recipe trains other weights under another torch or transformers, so a zoo built
    by other libraries is rebuilt, not reused)."""
    import torch
    import transformers

    libraries = {"torch": torch.__version__, "transformers": transformers.__version__}
    text = json.dumps([ZOO_FORMAT, asdict(recipe_of(size, seed)), libraries], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_zoo_dir(size: Size = "demo", seed: int = 0) -> Path:
    """Where `build_zoo(size)` caches its zoo: `$EVOMERGE_CACHE` or the user cache dir."""
    return cache_root() / "zoo" / f"{size}-{version(size, seed)}"


def resolve_model(ref: str, zoo_dir: Path | None = None) -> Path:
    """`zoo:NAME` → that model folder of the zoo (default: the demo zoo); else a path."""
    if ref.startswith("zoo:"):
        path = (zoo_dir if zoo_dir is not None else default_zoo_dir("demo")) / ref[4:]
    else:
        path = Path(ref).expanduser()
    if not (path / "config.json").is_file():
        hint = "; build the zoo with `evomerge zoo build`" if ref.startswith("zoo:") else ""
        raise FileNotFoundError(f"model folder not found (no config.json): {path}{hint}")
    return path


def read_manifest(root: Path) -> dict[str, Any]:
    """The zoo's `zoo.json`; FileNotFoundError when `root` holds no complete zoo."""
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no zoo at {root} (missing {MANIFEST}); run `evomerge zoo build`")
    return json.loads(path.read_text())


def _is_current(root: Path, size: Size, seed: int) -> bool:
    try:
        manifest = read_manifest(root)
    except FileNotFoundError:
        return False
    return manifest.get("size") == size and manifest.get("version") == version(size, seed)


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_zoo(
    size: Size = "demo", out: Path | None = None, progress: bool = True, seed: int = 0
) -> Path:
    """Return the zoo folder of `size` (drawn with `seed`), training it first when missing or
    out of date."""
    recipe_of(size, seed)  # a bad size fails here, before any folder is made
    root = Path(out).expanduser().resolve() if out else default_zoo_dir(size, seed)
    with _locked(root):
        if _is_current(root, size, seed):
            return root
        if root.exists() and any(root.iterdir()) and not (root / MANIFEST).is_file():
            raise FileExistsError(f"{root} exists and is not a zoo; choose another --out")
        for stale in root.parent.glob(f".{root.name}.building-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed build's; the lock says so
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
        try:
            manifest = _build(size, seed, tmp, root, progress)
            if root.exists():
                shutil.rmtree(root)
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"zoo {size} built in {manifest['seconds']:.0f} s: {root}", flush=True)
    return root


def _build(size: Size, seed: int, tmp: Path, final: Path, progress: bool) -> dict[str, Any]:
    """Write the whole zoo into `tmp`, which will be renamed to `final`; returns the manifest."""
    say: Callable[[str], None] = (lambda s: print(s, flush=True)) if progress else (lambda s: None)
    recipe = recipe_of(size, seed)
    start = time.perf_counter()
    if isinstance(recipe, CrossRecipe):
        manifest = build_cross(recipe, tmp, say, progress)
    else:
        manifest = _build_families(recipe, tmp, final, say, progress)
    manifest = {"size": size, "version": version(size, seed), **manifest}
    manifest["recipe"] = asdict(recipe)
    say("scoring the zoo on the held-out split")
    manifest["held_out"] = _score_table(tmp, manifest)
    manifest["seconds"] = round(time.perf_counter() - start, 1)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _build_families(
    recipe: ZooRecipe, tmp: Path, final: Path, say: Callable[[str], None], progress: bool
) -> dict[str, Any]:
    """Train the two families into `tmp`; returns the manifest without scores."""
    pairs = eval_pairs({"search": recipe.search_rows, "held-out": recipe.held_out_rows})
    exclude = excluded(pairs)
    tasks = write_tasks(tmp / "tasks", pairs, final)
    base, stranger, stranger_tuned, tuned = jobs(recipe)
    experts = [j for j in tuned if j.name != HARMFUL]

    def launch(pool: Any, job: Job, parent: str | None) -> Any:
        parent_dir = None if parent is None else tmp / parent
        return pool.apply_async(run_job, ((job, tmp / job.name, parent_dir, exclude, progress),))

    with mp.get_context("spawn").Pool(2) as pool:
        say(f"training base ({base.steps} steps) beside stranger ({stranger.steps} steps)")
        base_run, stranger_run = launch(pool, base, None), launch(pool, stranger, None)
        runs = [stranger_run]
        stranger_run.get()  # the stranger ends first: its expert starts while the base trains
        say(f"training {', '.join(j.name for j in stranger_tuned)} on the stranger")
        runs += [launch(pool, j, stranger.name) for j in stranger_tuned]
        base_run.get()
        say(f"training {len(experts)} experts and {HARMFUL} ({recipe.expert_steps} steps each)")
        runs += [base_run, *(launch(pool, j, base.name) for j in tuned)]
        seconds = dict(r.get() for r in runs)
    return {
        "base": "base",
        "experts": {j.name: j.name for j in experts},
        "harmful": HARMFUL,
        "stranger": stranger.name,
        "stranger_experts": {j.name: j.full[0] for j in stranger_tuned},
        "tasks": tasks,
        "train_seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def hand_merge(
    root: Path, weight: float = HAND_MERGE_WEIGHT, models: list[str] | None = None
) -> Any:
    """The zoo's hand-set merge: base + weight · Σ (model − base) over `models` (default: the
    experts), tensor by tensor, in ten lines of its own, so the zoo is judged without the
    merge engine it is there to test."""
    import torch
    from transformers import AutoModelForCausalLM

    manifest = read_manifest(root)
    model = AutoModelForCausalLM.from_pretrained(root / manifest["base"])
    merged = model.state_dict()
    base = {k: v.clone() for k, v in merged.items()}
    with torch.no_grad():
        for name in manifest["experts"] if models is None else models:
            expert = AutoModelForCausalLM.from_pretrained(root / name).state_dict()
            for k, v in merged.items():
                v += weight * (expert[k] - base[k])
    return model.eval()


def model_names(manifest: dict[str, Any]) -> list[str]:
    """The zoo's models in table order: base, experts, then (the two-family zoos) harmful,
    stranger and the stranger's experts."""
    names = [manifest["base"], *manifest["experts"]]
    if "stranger" in manifest:
        names += [manifest["harmful"], manifest["stranger"], *manifest["stranger_experts"]]
    return names


def _score_table(root: Path, manifest: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Held-out metrics of every model on every native task (lm-eval duplicates add_choice)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from evomerge.fitness import Evaluator
    from evomerge.tasks import load_task

    specs = [load_task(root / "tasks" / f"{t}.yaml") for t in manifest["tasks"]]
    evaluator = Evaluator([s for s in specs if s.kind != "lm_eval"], split="held-out")
    table = {}
    hf_logging.disable_progress_bar()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only wait on each other
    try:
        for name in model_names(manifest):
            model = AutoModelForCausalLM.from_pretrained(root / name)
            tokenizer = AutoTokenizer.from_pretrained(root / name)
            metrics = evaluator.score(model, tokenizer).metrics
            table[name] = {k: round(v, 4) for k, v in metrics.items()}
    finally:
        torch.set_num_threads(threads)
    return table
