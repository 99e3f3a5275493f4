"""Proxy tasks as data: a YAML definition next to JSONL files, one file per split.

Kinds and their JSONL rows:

- `generate`: `{"prompt", "answer"}`; greedy decoding, the answer extracted by a rule,
  exact-match accuracy (the paper's MGSM metric).
- `choice`: `{"prompt", "choices": [...], "answer": index}`; the choice with the highest
  summed log-likelihood wins, accuracy as lm-eval's `acc`.
- `perplexity`: `{"text"}`; perplexity = exp(mean token loss), lower is better.
- `lm_eval`: any lm-eval-harness task, named by `lm_eval_task` (`{split}` in the name is
  replaced by the split), found through `include_path` when it is not built in.

Paths in a YAML file are relative to that file; `load_task` makes them absolute.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SPLITS = ("search", "held-out")
Kind = Literal["generate", "choice", "perplexity", "lm_eval"]
ROW_KEYS: dict[str, tuple[str, ...]] = {
    "generate": ("prompt", "answer"),
    "choice": ("prompt", "choices", "answer"),
    "perplexity": ("text",),
}


class TaskSpec(BaseModel):
    """One proxy task. Frozen and strict: an unknown field is an error that names it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Kind
    description: str = ""
    splits: dict[str, Path] = Field(default_factory=dict)
    max_new_tokens: int = Field(default=32, ge=1)
    answer_regex: str | None = None
    lm_eval_task: str | None = None
    include_path: Path | None = None
    metric: str | None = None
    higher_is_better: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if self.kind == "lm_eval":
            if not self.lm_eval_task:
                raise ValueError("an lm_eval task needs lm_eval_task")
        elif not self.splits:
            raise ValueError(f"a {self.kind} task needs splits (split name -> JSONL file)")
        elif (
            self.lm_eval_task
            or self.include_path
            or self.metric
            or self.higher_is_better is not None
        ):
            raise ValueError(
                "lm_eval_task, include_path, metric and higher_is_better only apply to "
                f"lm_eval tasks, not {self.kind}"
            )
        if self.answer_regex is not None:
            if self.kind != "generate":
                raise ValueError("answer_regex only applies to generate tasks")
            try:
                re.compile(self.answer_regex)
            except re.error as e:
                raise ValueError(f"answer_regex is not a regular expression: {e}") from e
        return self

    @property
    def metric_name(self) -> str:
        """The metric reported for this task."""
        defaults = {"generate": "exact_match", "choice": "acc", "perplexity": "perplexity"}
        return self.metric or defaults.get(self.kind, "acc")

    @property
    def lower_is_better(self) -> bool:
        if self.higher_is_better is not None:
            return not self.higher_is_better
        return self.kind == "perplexity"

    def data_file(self, split: str) -> Path:
        """The JSONL file of `split`; a clear error when the task has no such split."""
        if split not in self.splits:
            raise KeyError(
                f"task {self.name!r} has no split {split!r}; it has {sorted(self.splits)}"
            )
        return self.splits[split]

    def rows(self, split: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The first `limit` rows of a split, each checked for this kind's keys."""
        path = self.data_file(split)
        if not path.is_file():
            raise FileNotFoundError(f"task {self.name!r}: data file not found: {path}")
        rows = []
        with path.open() as f:
            for n, line in enumerate(f, 1):
                if limit is not None and len(rows) >= limit:
                    break
                if not line.strip():
                    continue
                row = json.loads(line)
                missing = [k for k in ROW_KEYS[self.kind] if k not in row]
                if missing:
                    raise ValueError(f"{path}:{n}: a {self.kind} row needs {missing}")
                rows.append(row)
        return rows

    def extract(self, text: str) -> str:
        """The answer in a generated text: `answer_regex`'s first group (or match), else the
        first line, stripped."""
        if self.answer_regex is None:
            return text.strip().split("\n", 1)[0].strip()
        m = re.search(self.answer_regex, text)
        if m is None:
            return ""
        return (m.group(1) if m.groups() else m.group(0)).strip()


def load_task(ref: str | Path, zoo_dir: Path | None = None) -> TaskSpec:
    """A task from `"zoo:NAME"` (the zoo's `tasks/NAME.yaml`) or a YAML path."""
    ref = str(ref)
    if ref.startswith("zoo:"):
        from evomerge.zoo import default_zoo_dir

        root = zoo_dir if zoo_dir is not None else default_zoo_dir("demo")
        path = root / "tasks" / f"{ref[4:]}.yaml"
    else:
        path = Path(ref)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a task file must be a YAML mapping")
    here = path.parent.resolve()
    if isinstance(data.get("splits"), dict):
        data["splits"] = {k: here / v for k, v in data["splits"].items()}
    if isinstance(data.get("include_path"), str):
        data["include_path"] = here / data["include_path"]
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as e:
        from evomerge.config import field_errors

        raise ValueError(f"{path}: invalid task file\n{field_errors(e)}") from e


def save_task(spec: TaskSpec, path: Path) -> None:
    """Write `spec` as YAML with its paths relative to `path`'s folder (when they are under it)."""
    data = spec.model_dump(mode="json", exclude_defaults=True)
    here = path.parent.resolve()

    def rel(p: str) -> str:
        q = Path(p)
        return str(q.relative_to(here)) if q.is_absolute() and q.is_relative_to(here) else p

    if "splits" in data:
        data["splits"] = {k: rel(v) for k, v in data["splits"].items()}
    if "include_path" in data:
        data["include_path"] = rel(data["include_path"])
    path.write_text(yaml.safe_dump(data, sort_keys=False))
