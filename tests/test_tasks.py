"""Task definitions: YAML in, a strict frozen TaskSpec out, with errors that name the culprit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from evomerge.tasks import TaskSpec, load_task, save_task


def write_task(folder: Path, **fields) -> Path:
    data = {"name": "t", "kind": "generate", "splits": {"search": "t.jsonl"}, **fields}
    path = folder / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_zoo_tasks_load_with_absolute_paths(zoo_dir: Path) -> None:
    spec = load_task("zoo:add", zoo_dir)
    assert spec.kind == "generate" and spec.metric_name == "exact_match"
    assert all(p.is_absolute() and p.is_file() for p in spec.splits.values())
    rows = spec.rows("held-out", limit=5)
    assert len(rows) == 5 and all(set(r) == {"prompt", "answer"} for r in rows)
    assert load_task("zoo:text", zoo_dir).lower_is_better
    lm = load_task("zoo:add_choice_lm", zoo_dir)
    assert lm.kind == "lm_eval" and lm.include_path is not None and lm.include_path.is_dir()


def test_bad_field_names_the_field_and_the_file(tmp_path: Path) -> None:
    path = write_task(tmp_path, max_new_tokenz=4)
    with pytest.raises(ValueError, match=r"(?s)t\.yaml.*max_new_tokenz"):
        load_task(str(path))
    with pytest.raises(ValueError, match=r"(?s)t\.yaml.*kind") as bad:
        load_task(str(write_task(tmp_path, kind="essay")))
    assert "  kind: " in str(bad.value) and "pydantic.dev" not in str(bad.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"splits": {}}, "needs splits"),
        ({"kind": "choice", "answer_regex": "(\\d+)"}, "answer_regex only applies"),
        ({"kind": "lm_eval", "splits": {}}, "needs lm_eval_task"),
        ({"lm_eval_task": "hellaswag"}, "only apply to lm_eval"),
        ({"answer_regex": "("}, "answer_regex"),
        ({"name": "a b"}, "name"),
    ],
)
def test_inconsistent_task_is_refused(tmp_path: Path, fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_task(str(write_task(tmp_path, **fields)))


def test_spec_is_frozen() -> None:
    spec = TaskSpec(name="t", kind="perplexity", splits={"search": Path("x.jsonl")})
    with pytest.raises(ValidationError):
        spec.name = "u"  # type: ignore[misc]


def test_missing_files_are_named(tmp_path: Path, zoo_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_task(str(tmp_path / "nope.yaml"))
    with pytest.raises(FileNotFoundError, match="no_such_task"):
        load_task("zoo:no_such_task", zoo_dir)
    spec = load_task(str(write_task(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"t\.jsonl"):
        spec.rows("search")
    with pytest.raises(KeyError, match="held-out"):
        spec.rows("held-out")


def test_rows_are_checked_for_their_kind(tmp_path: Path) -> None:
    spec = load_task(str(write_task(tmp_path)))
    (tmp_path / "t.jsonl").write_text(
        json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" + json.dumps({"prompt": "x"}) + "\n"
    )
    assert spec.rows("search", limit=1) == [{"prompt": "1+1=", "answer": "2"}]
    with pytest.raises(ValueError, match=r"t\.jsonl:2.*answer"):
        spec.rows("search")


def test_answer_extraction_rules() -> None:
    plain = TaskSpec(name="t", kind="generate", splits={"search": Path("x")})
    assert plain.extract("  42 \nmore") == "42"
    mgsm = plain.model_copy(update={"answer_regex": r"answer is (-?\d+)"})
    assert mgsm.extract("so the answer is -7.") == "-7" and mgsm.extract("no idea") == ""


def test_save_and_load_round_trip_with_relative_paths(tmp_path: Path) -> None:
    spec = TaskSpec(
        name="t",
        kind="choice",
        splits={"search": tmp_path / "t.search.jsonl", "held-out": tmp_path / "t.h.jsonl"},
    )
    save_task(spec, tmp_path / "t.yaml")
    assert yaml.safe_load((tmp_path / "t.yaml").read_text())["splits"]["search"] == (
        "t.search.jsonl"
    )
    assert load_task(str(tmp_path / "t.yaml")) == spec
