"""The dashboard's server side: pages, actions and security over a real SQLite store."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from evomerge.cli import app as cli
from evomerge.config import StudyConfig
from evomerge.dashboard import create_app
from evomerge.dashboard.charts import best_so_far, nice_ticks, thin
from evomerge.dashboard.configform import MAX_ERRORS
from evomerge.dashboard.guard import COOKIE
from evomerge.dashboard.sample import (
    NUM_LAYERS,
    SOURCES,
    config_yaml,
    fill_study,
    one_trial_study,
    ps_recipe,
)
from evomerge.recipe import Recipe, layer_group_names
from storage import Store

LOCAL = "http://127.0.0.1"


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory, zoo_dir: Path) -> str:
    """A database with a finished TIES study, a live one, and a DFS study (test zoo)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('dash') / 'studies.db'}"
    with Store(url) as store:
        store.migrate()
        fill_study(store, "ties-done", 120, budget=120)
        fill_study(store, "ties-live", 20, budget=100, end=None, seed=1)
        fill_study(store, "dfs-done", 30, method="dataflow", seed=2, zoo="test")
    return url


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    out = {name: tmp_path / name for name in ("configs", "exports", "runs", "models")}
    for path in out.values():
        path.mkdir()
    (out["configs"] / "demo.yaml").write_text(config_yaml("demo"))
    return out


def make_client(url: str, dirs: dict[str, Path], **kwargs: object) -> TestClient:
    app = create_app(
        url,
        model_roots=(dirs["models"],),
        export_dir=dirs["exports"],
        configs_dir=dirs["configs"],
        run_dir=dirs["runs"],
        **kwargs,
    )
    return TestClient(app, base_url=LOCAL, follow_redirects=False)


@pytest.fixture
def client(filled: str, dirs: dict[str, Path]) -> Iterator[TestClient]:
    with make_client(filled, dirs) as c:
        yield c


def text_of(html: str, element_id: str) -> str:
    """The text of the element with `element_id` (tags stripped)."""
    m = re.search(rf'id="{element_id}"[^>]*>(.*?)</', html, re.S)
    assert m, f"no element #{element_id}"
    return re.sub(r"<[^>]+>", "", m.group(1)).strip()


# Pages


def test_studies_list_shows_status_progress_and_best(client: TestClient, filled: str) -> None:
    page = client.get("/").text
    with Store(filled) as store:
        best = store.best("ties-done", top=1)[0].fitness
    row = re.search(r"ties-done</a></td>(.*?)</tr>", page, re.S).group(1)
    assert "finished" in row and "111 / 120" in row and "(9 failed)" in row
    assert f"{best:.4f}" in row
    live = re.search(r"ties-live</a></td>(.*?)</tr>", page, re.S).group(1)
    assert "running" in live and "19 / 100" in live


def test_study_page_charts_table_and_runs(client: TestClient) -> None:
    page = client.get("/studies/ties-done").text
    assert page.count('<svg class="chart"') == 2
    assert 'class="best"' in page and 'class="fails"' in page
    assert text_of(page, "done") == "111 / 120"  # the budget counts complete trials
    assert text_of(page, "busy") == "0 / 2"
    assert text_of(page, "outcomes") == "111 · 9"  # every 13th trial fails
    numbers = re.findall(r'/studies/ties-done/trials/(\d+)"', page)
    assert numbers[:3] == ["119", "118", "117"]  # newest first by default
    assert len(numbers) == 25
    assert "page 1 of 5" in page
    assert "budget reached" in page and "4242" in page  # runs history


def test_study_page_on_every_backend(db_url: str, dirs: dict[str, Path]) -> None:
    """The dashboard's own queries (sorting, chart series, times) on SQLite and PostgreSQL."""
    with Store(db_url) as store:
        store.migrate()
        fill_study(store, "-odd-name", 30, end=None)
        by_fitness = [r.number for r in store.trials("-odd-name", order_by="fitness")]
    with make_client(db_url, dirs) as c:
        page = c.get("/studies/-odd-name?sort=fitness").text
        numbers = [int(n) for n in re.findall(r'/trials/(\d+)"', page)]
        assert numbers == by_fitness[:25]
        assert page.count('<path class="dots" d="M') == 2
        assert text_of(page, "generation") == "3: 6 / 8 done"
        assert "seconds since the first trial finished" in page


def test_trials_table_sorts_and_pages(client: TestClient, filled: str) -> None:
    with Store(filled) as store:
        by_fitness = [r.number for r in store.trials("ties-done", order_by="fitness")]
    page = client.get("/studies/ties-done?sort=fitness&desc=1&page=3").text
    numbers = [int(n) for n in re.findall(r'/studies/ties-done/trials/(\d+)"', page)]
    assert numbers == by_fitness[50:75]
    ascending = client.get("/studies/ties-done?sort=number&desc=0").text
    assert re.findall(r'/trials/(\d+)"', ascending)[:2] == ["0", "1"]
    assert client.get("/studies/ties-done?sort=recipe_json").status_code == 400
    assert client.get("/studies/ties-done?sort=number_x").status_code == 400


def test_live_fragment_and_generation_progress(client: TestClient) -> None:
    fragment = client.get("/studies/ties-live/live").text
    assert "<html" not in fragment
    assert text_of(fragment, "status") == "running"
    assert text_of(fragment, "generation").startswith("2: 4 / 8 done")


def test_a_dead_run_shows_nothing_running(tmp_path: Path, dirs: dict[str, Path]) -> None:
    """A coordinator SIGKILLed mid-generation: once its heartbeat is stale the page says
    interrupted everywhere, not a study interrupted beside busy workers and a running run."""
    from storage.schema import runs

    url = f"sqlite:///{tmp_path / 'killed.db'}"
    with Store(url) as store:
        store.migrate()
        fill_study(store, "killed", 20, budget=100, end=None, seed=1)
        run_id = store.runs("killed")[-1].id
        recipe = Recipe.from_json(store.trials("killed")[-1].recipe_json)
        for number in (20, 21):  # in flight when the coordinator died
            store.record_trial_started("killed", run_id, number, 3, recipe, "w0")
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # its last heartbeat, an hour ago
        conn.execute(sa.update(runs).values(heartbeat_at=datetime.now(UTC) - timedelta(hours=1)))
    engine.dispose()
    with make_client(url, dirs) as c:
        fragment = c.get("/studies/killed/live").text
    assert text_of(fragment, "status") == "interrupted"
    assert text_of(fragment, "busy").startswith("0")
    assert "running" not in text_of(fragment, "generation")
    runs_table = fragment[fragment.index('id="runs"') :]
    assert "heartbeat lost" in runs_table and ">running<" not in runs_table


def test_a_chain_links_its_stages_and_a_foreign_config_is_named(
    tmp_path: Path, dirs: dict[str, Path]
) -> None:
    """PS+DFS's two studies link each other (the chain's logs and its Stop are on the
    first), but a study that only has a stage's name is no stage; a stored config this
    version cannot read is said, not silently dropped."""
    url = f"sqlite:///{tmp_path / 'chain.db'}"
    ps_dfs = StudyConfig.from_yaml(
        config_yaml("chain", zoo="test") + "dataflow: {b: zoo:translate, scales: pair}\n"
    )
    stage = ps_dfs.dataflow_stage(ps_recipe(random.Random(0)).to_json())
    with Store(url) as store:
        store.migrate()
        for config in (ps_dfs, stage):
            store.create_study(config.name, config.to_yaml(), optuna_study_name=config.name)
        fill_study(store, "lone", 8)
        fill_study(store, "lone-dfs", 8, method="dataflow", seed=2, zoo="test")
        fill_study(store, "future", 4)
        future = store.get_study("future").config_yaml + "fitness_cache: {days: 3}\n"
        store.create_study("future-2", future, optuna_study_name="future-2")
    with make_client(url, dirs) as c:
        first, second = c.get("/studies/chain").text, c.get("/studies/chain-dfs").text
        lone, lone_dfs = c.get("/studies/lone").text, c.get("/studies/lone-dfs").text
        foreign = c.get("/studies/future-2")
    assert 'href="/studies/chain-dfs"' in text_of_html(first, "chain")
    assert 'href="/studies/chain"' in text_of_html(second, "chain")
    assert 'id="chain"' not in lone and 'id="chain"' not in lone_dfs
    assert foreign.status_code == 200
    assert "fitness_cache" in text_of(foreign.text, "config-error")


def text_of_html(html: str, element_id: str) -> str:
    """The inner HTML of the element with `element_id`."""
    m = re.search(rf'id="{element_id}"[^>]*>(.*?)</p>', html, re.S)
    assert m, f"no element #{element_id}"
    return m.group(1)


def test_trial_page_draws_heatmaps_metrics_and_timings(client: TestClient, filled: str) -> None:
    with Store(filled) as store:
        row = store.best("ties-done", top=1)[0]
    recipe = Recipe.from_json(row.recipe_json)
    page = client.get(f"/studies/ties-done/trials/{row.number}").text
    assert page.count('<svg class="heatmap"') == 2  # weight and density
    assert f"{len(recipe.groups)} layer groups" in page
    cells = len(SOURCES) * len(recipe.groups) * 2
    assert page.count("<rect x=") == cells
    w = recipe.value("weight", "layers.2-3", 1)
    assert f"zoo:reverse · layers.2-3 · weight = {w:.4f}" in page
    assert text_of(page, "fitness") == f"{row.fitness:.4f}"
    assert text_of(page, "heldout") == f"{row.heldout:.4f}"
    metrics = re.search(r'id="metrics".*?</table>', page, re.S).group(0)
    assert metrics.count("<tr>") == 1 + 3 and "zoo:translate" in metrics


def test_trial_page_draws_the_dfs_path(client: TestClient, filled: str) -> None:
    with Store(filled) as store:
        row = store.trial("dfs-done", 0)
    flow = Recipe.from_json(row.recipe_json).dataflow
    page = client.get("/studies/dfs-done/trials/0").text
    assert page.count("<circle") == len(flow.path)
    assert f"×{flow.scales[3]:.2f}" in page
    assert page.count('marker-end="url(#arrow)"') == len(flow.path) - 1
    assert "layer groups" not in page  # a route merges nothing: no "0 layer groups"


def test_similarity_page_draws_the_matrix_and_its_clusters(client: TestClient) -> None:
    page = client.get("/studies/dfs-done/similarity")
    assert page.status_code == 200, page.text
    clusters = text_of(page.text, "clusters")
    assert clusters == "zoo:add, zoo:reverse"
    assert page.text.count('class="cluster"') == 1  # one cluster, of both models
    assert page.text.count("<rect") == 4 + page.text.count('class="cluster"')
    apart = client.get("/studies/dfs-done/similarity", params={"threshold": 1})
    assert apart.text.count('class="cluster"') == 2 and "another initialisation" in apart.text
    assert client.get("/studies/dfs-done/similarity", params={"threshold": 2}).status_code == 400
    assert client.get("/studies/nope/similarity").status_code == 404


def test_failed_trial_shows_its_error(client: TestClient, filled: str) -> None:
    page = client.get("/studies/ties-done/trials/12").text
    assert "NaN logits" in text_of(page, "error")
    assert text_of(page, "unscored") == "This trial is FAIL: its checkpoint would be unscored."
    with Store(filled) as store:
        best = store.best("ties-done", top=1)[0].number
    assert 'id="unscored"' not in client.get(f"/studies/ties-done/trials/{best}").text


def test_recipe_json_download_round_trips(client: TestClient, filled: str) -> None:
    response = client.get("/studies/ties-done/trials/5/recipe.json")
    assert "attachment" in response.headers["content-disposition"]
    with Store(filled) as store:
        stored = Recipe.from_json(store.trial("ties-done", 5).recipe_json)
    assert Recipe.model_validate(response.json()) == stored


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Model folders holding a Llama config, which is all a mergekit config reads."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("models")
    config = LlamaConfig(
        num_hidden_layers=NUM_LAYERS,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
    )
    out = {}
    for name in ("base", "arith", "reverse", "translate"):
        config.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def test_mergekit_yaml_download_is_a_mergekit_config(
    client: TestClient, filled: str, model_dirs: dict[str, str]
) -> None:
    from mergekit.config import MergeConfiguration

    sources = tuple(model_dirs[n] for n in ("arith", "reverse", "translate"))
    with Store(filled) as store:
        fill_study(store, "on-disk", 5, base=model_dirs["base"], sources=sources, seed=4)
        recipe = Recipe.from_json(store.trial("on-disk", 3).recipe_json)
    response = client.get("/studies/on-disk/trials/3/mergekit.yaml")
    assert response.status_code == 200, response.text
    assert "attachment" in response.headers["content-disposition"]
    raw = yaml.safe_load(response.text)
    merge = MergeConfiguration.model_validate(raw)
    assert merge.merge_method == "ties"
    assert str(merge.base_model.model) == model_dirs["base"]
    members = raw["slices"][0]["sources"]
    assert [m["model"] for m in members][:3] == list(sources)
    weight = members[0]["parameters"]["weight"]
    expected = recipe.value("weight", "layers.0-1", 0)
    assert weight == expected or weight[-1] == {"value": expected}


def test_mergekit_yaml_of_a_dfs_recipe_is_a_passthrough_config(client: TestClient) -> None:
    assert "(passthrough)" in client.get("/studies/dfs-done/trials/0").text
    r = client.get("/studies/dfs-done/trials/0/mergekit.yaml")
    assert r.status_code == 200 and "APPROXIMATION" in r.text
    config = yaml.safe_load(r.text)
    assert config["merge_method"] == "passthrough" and len(config["slices"]) == 14


def test_missing_study_and_trial_are_404(client: TestClient) -> None:
    assert client.get("/studies/nope").status_code == 404
    assert client.get("/studies/ties-done/trials/9999").status_code == 404
    huge = 10**20  # past SQL's integers: still "no such trial", never a 500
    assert client.get(f"/studies/ties-done/trials/{huge}").status_code == 404
    assert client.get(f"/compare?pick=ties-done:1&pick=ties-done:{huge}").status_code == 404
    assert client.post(f"/studies/ties-done/trials/{huge}/export").status_code == 404


def test_best_page_filters(client: TestClient, filled: str) -> None:
    def numbers(query: str) -> list[tuple[str, str]]:
        page = client.get(f"/best?{query}").text
        return re.findall(r'/studies/([\w.-]+)/trials/(\d+)"', page)

    assert len(numbers("top=7")) == 7
    assert {s for s, _ in numbers("top=50&method=dataflow")} == {"dfs-done"}
    with Store(filled) as store:
        top = store.best("ties-done", top=3, task="zoo:add")
        held = store.best(None, top=100, min_heldout=0.5)
    assert numbers("study=ties-done&task=zoo:add&top=3") == [
        ("ties-done", str(r.number)) for r in top
    ]
    assert len(numbers("min_heldout=0.5&top=100")) == len(held)
    assert numbers("min_heldout=&method=&top=2")  # empty fields mean "no filter"
    assert client.get("/best?min_heldout=abc").status_code == 400


def test_compare_two_recipes(client: TestClient) -> None:
    page = client.get("/compare?pick=ties-done:3&pick=dfs-done:0").text
    assert "ties-done · trial 3" in page and "dfs-done · trial 0" in page
    assert page.count('<svg class="heatmap"') == 2 and "<circle" in page
    assert client.get("/compare?pick=ties-done:3").status_code == 400


# Actions


def test_stop_and_cancel_request_a_stop(filled: str, dirs: dict[str, Path]) -> None:
    with Store(filled) as store, make_client(filled, dirs) as c:
        r = c.post("/studies/ties-live/stop?sort=fitness&desc=0&page=2")
        assert r.status_code == 303  # back to the page as it was sorted
        assert r.headers["location"].endswith("?sort=fitness&desc=0&page=2&note=stop")
        assert store.stop_request("ties-live") == "stop"
        c.post("/studies/ties-live/cancel")
        c.post("/studies/ties-live/stop")
        assert store.stop_request("ties-live") == "cancel"  # as in the CLI: never weakened
        assert "Cancel requested" in c.get(r.headers["location"].replace("stop", "cancel")).text
        store.clear_stop_request("ties-live")
        assert c.post("/studies/nope/stop").status_code == 404


def test_resume_refuses_a_live_study(client: TestClient, dirs: dict[str, Path]) -> None:
    r = client.post("/studies/ties-live/resume")
    assert r.headers["location"].endswith("note=busy")
    assert not list(dirs["runs"].rglob("*.log"))


def wait_for(done: Callable[[], bool], logs: Callable[[], list[Path]], timeout: float = 120) -> str:
    """The logs' text once `done()`; fails at once when a log shows a traceback."""
    deadline = time.monotonic() + timeout
    while True:
        text = "".join(p.read_text() for p in logs())
        if done():
            return text
        assert "Traceback" not in text, text
        assert time.monotonic() < deadline, f"not done after {timeout} s; logs: {text}"
        time.sleep(0.2)


def wait_for_log(logs: list[Path], needle: str) -> str:
    """The logs' text once `needle` is in it."""
    return wait_for(lambda: needle in "".join(p.read_text() for p in logs), lambda: logs)


def test_resume_launches_the_cli_detached_with_a_log(
    filled: str, client: TestClient, dirs: dict[str, Path]
) -> None:
    model = dirs["models"] / "missing-model"
    text = config_yaml("resumable", base=str(model))
    with Store(filled) as store:
        store.create_study("resumable", text, optuna_study_name="resumable", budget_trials=5)
    r = client.post("/studies/resumable/resume")
    assert r.headers["location"].endswith("note=resumed")
    logs = list((dirs["runs"] / "resumable").glob("*-resume.log"))
    assert len(logs) == 1
    # The real `evomerge resume` process starts, reads the study's config from the
    # database and says why it cannot run: its base model folder does not exist.
    wait_for_log(logs, "missing-model")
    page = client.get("/studies/resumable").text
    assert logs[0].name in page
    assert "missing-model" in client.get(f"/studies/resumable/logs/{logs[0].name}").text


# New study


def test_new_study_page_offers_the_configs(client: TestClient) -> None:
    page = client.get("/new").text
    assert '<option value="demo.yaml" selected>' in page
    assert "name: demo" in page
    own = client.get("/new?config=")  # "(paste your own)": an empty form, not demo.yaml
    assert own.status_code == 200 and "name: demo" not in own.text
    assert '<option value="demo.yaml" selected>' not in own.text
    for missing in ("nope.yaml", "fusion"):
        assert client.get(f"/new?config={missing}").status_code == 404


def test_new_study_shows_errors_at_their_fields(client: TestClient) -> None:
    text = (
        config_yaml("bad").replace("high: 1.0}", "high: -1.0}", 1).replace("count: 2", "count: 0")
    )
    r = client.post("/new", data={"yaml": text, "name": ""})
    assert r.status_code == 422
    lines = text.splitlines()
    weight_line = next(i for i, s in enumerate(lines, 1) if "weight:" in s)
    count_line = next(i for i, s in enumerate(lines, 1) if "count: 0" in s)
    errors = dict(re.findall(r'data-field="([^"]+)" data-line="(\d+)"', r.text))
    assert errors == {"search.weight": str(weight_line), "workers.count": str(count_line)}
    assert "must be below high" in r.text
    assert f'class="marker" style="top: {7 + (count_line - 1) * 18}px"' in r.text


def test_new_study_reports_broken_yaml_with_its_line(client: TestClient) -> None:
    r = client.post("/new", data={"yaml": "name: x\nsources: [a, b\nmethod: ties\n"})
    assert r.status_code == 422
    assert re.search(r'data-field="\(yaml\)" data-line="\d+"', r.text)


def test_new_study_refuses_models_outside_the_roots(client: TestClient) -> None:
    text = config_yaml("outside").replace("zoo:reverse", "/etc").replace("zoo:base", "zoo:../x")
    r = client.post("/new", data={"yaml": text})
    assert r.status_code == 422
    fields = set(re.findall(r'<li class="field-error" data-field="([^"]+)"', r.text))
    assert fields == {"base", "sources.1", "fitness.tasks.1.task"}


def test_new_study_checks_dataflow_configs(client: TestClient) -> None:
    routed = config_yaml("ps-dfs") + "dataflow: {b: /etc, trials: 4}\n"
    r = client.post("/new", data={"yaml": routed})
    assert r.status_code == 422
    assert set(re.findall(r'data-field="([^"]+)"', r.text)) == {"dataflow.b"}
    no_route = config_yaml("dfs", method="dataflow").replace("zoo:reverse]", "zoo:a, zoo:b]")
    r = client.post("/new", data={"yaml": no_route})
    assert r.status_code == 422 and "exactly two models" in r.text


def test_new_study_refuses_a_taken_or_unsafe_name(client: TestClient) -> None:
    taken = client.post("/new", data={"yaml": config_yaml("x"), "name": "ties-done"})
    assert taken.status_code == 422 and "exists" in taken.text
    for name in ("..", "."):  # no folder of their own, and a browser drops them from a URL
        dots = client.post("/new", data={"yaml": config_yaml("x"), "name": name})
        assert dots.status_code == 422 and 'data-field="name"' in dots.text
    in_yaml = client.post("/new", data={"yaml": config_yaml("..")})
    assert in_yaml.status_code == 422 and 'data-field="name"' in in_yaml.text


def test_yaml_is_parsed_safely(client: TestClient, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = f"!!python/object/apply:os.system ['touch {marker}']\n"
    r = client.post("/new", data={"yaml": text})
    assert r.status_code == 422 and not marker.exists()


def test_new_study_starts_the_coordinator_process(
    client: TestClient, dirs: dict[str, Path], filled: str, zoo_dir: Path
) -> None:
    text = config_yaml("started", zoo="test", trials=2, workers=1)
    r = client.post("/new", data={"yaml": text, "name": "started"})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/studies/started?note=started"
    # A second click while the run starts up (409) or once it registered (422, exists)
    # spawns no second coordinator.
    again = client.post("/new", data={"yaml": text, "name": "started"})
    assert again.status_code in (409, 422), again.text
    folder = dirs["runs"] / "started"
    assert len(list(folder.glob("*-run.log"))) == 1
    snapshot = next(folder.glob("*-config.yaml"))
    assert yaml.safe_load(snapshot.read_text())["name"] == "started"
    with Store(filled) as store:  # the real `evomerge run` registers it, then is cancelled
        wait_for(lambda: bool(store.get_study("started", missing_ok=True)), folder.iterdir)
        store.request_stop("started", "cancel")
        wait_for(lambda: store.get_study("started").status != "running", folder.iterdir)
    assert client.get("/studies/started").status_code == 200


def test_new_study_runs_the_same_preflight_as_the_cli(
    client: TestClient, dirs: dict[str, Path], zoo_dir: Path
) -> None:
    """A broken model folder under the roots is refused at its field; nothing starts."""
    broken = dirs["models"] / "add"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"")
    text = config_yaml("broken", zoo="test", sources=(str(broken), "zoo:reverse"))
    r = client.post("/new", data={"yaml": text})
    assert r.status_code == 422
    assert set(re.findall(r'data-field="([^"]+)"', r.text)) == {"sources.0"}
    assert not list(dirs["runs"].iterdir())


def test_new_study_judges_paths_and_ray_as_the_run_would(client: TestClient) -> None:
    relative = config_yaml("rel", zoo="test", base="models/base")
    r = client.post("/new", data={"yaml": relative})
    assert r.status_code == 422 and "relative" in r.text
    assert set(re.findall(r'data-field="([^"]+)"', r.text)) == {"base"}
    elsewhere = config_yaml("ray", zoo="test").replace(
        "workers: {count: 2}", "workers: {count: 2, ray_address: '10.1.2.3:6379'}"
    )
    r = client.post("/new", data={"yaml": elsewhere})
    assert r.status_code == 422
    assert set(re.findall(r'data-field="([^"]+)"', r.text)) == {"workers.ray_address"}


def test_thousands_of_invalid_items_are_reported_briefly_off_the_event_loop(
    client: TestClient,
) -> None:
    bad = "".join(f"  p{i}: {{low: 1, high: 0}}\n" for i in range(4000))
    text = config_yaml("many").replace("search:\n", "search:\n" + bad, 1)
    answers: dict[str, float] = {}

    def post() -> None:
        start = time.monotonic()
        answers["status"] = client.post("/new", data={"yaml": text}).status_code
        answers["post_s"] = time.monotonic() - start

    poster = threading.Thread(target=post)
    poster.start()
    start = time.monotonic()
    assert client.get("/static/style.css").status_code == 200
    answers["get_s"] = time.monotonic() - start
    poster.join(timeout=120)
    assert answers["status"] == 422 and answers["post_s"] < 60, answers
    assert answers["get_s"] < 10, answers
    r = client.post("/new", data={"yaml": text})
    assert len(re.findall(r'<li class="field-error"', r.text)) == MAX_ERRORS + 1
    assert "more errors not shown" in r.text


def test_pages_cannot_be_framed(client: TestClient) -> None:
    for r in (client.get("/"), client.get("/", headers={"Host": "evil.example"})):
        assert r.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


@pytest.mark.slow
def test_export_builds_a_checkpoint_in_the_export_folder(
    filled: str, client: TestClient, dirs: dict[str, Path], zoo_dir: Path
) -> None:
    """A real `evomerge export` of a task-arithmetic trial over the test zoo."""
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(zoo_dir / "base").num_hidden_layers
    sources = ("zoo:add", "zoo:reverse")
    groups = layer_group_names(layers, 2)
    recipe = Recipe(
        method="task_arithmetic",
        base="zoo:base",
        sources=sources,
        groups=groups,
        params={"weight": ((0.6, 0.4),) * len(groups)},
    )
    with Store(filled) as store:
        one_trial_study(store, "exportable", recipe, fitness=0.5)
    r = client.post("/studies/exportable/trials/0/export", data={"folder": "ckpt"})
    assert r.headers["location"] == "/studies/exportable/trials/0?note=export"
    out = dirs["exports"] / "ckpt"
    wait_for(
        lambda: (out / "recipe.json").is_file(),
        lambda: list((dirs["runs"] / "exportable").glob("*-export.log")),
    )
    assert Recipe.load(out / "recipe.json") == recipe
    assert (out / "config.json").is_file() and (out / "mergekit_config.yml").is_file()
    again = client.post("/studies/exportable/trials/0/export", data={"folder": "ckpt"})
    assert again.headers["location"].endswith("note=exists")


# Security


def test_token_is_required_on_every_request(filled: str, dirs: dict[str, Path]) -> None:
    with make_client(filled, dirs, token="s3cret") as c:
        assert c.get("/").status_code == 401
        assert c.get("/static/style.css").status_code == 401
        assert c.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = c.get("/best?top=3&token=s3cret")
        assert r.status_code == 303 and r.headers["location"] == "/best?top=3"
        assert "httponly" in r.headers["set-cookie"].lower()
        assert "samesite=strict" in r.headers["set-cookie"].lower()
        assert c.get("/best?top=3").status_code == 200  # the cookie now carries it
        c.cookies.clear()
        c.cookies.set(COOKIE, "wrong")
        assert c.get("/").status_code == 401


def test_only_loopback_hosts_without_a_token(filled: str, dirs: dict[str, Path]) -> None:
    with make_client(filled, dirs) as c:
        assert c.get("/", headers={"Host": "evil.example:8000"}).status_code == 421
        assert c.get("/", headers={"Host": "localhost:8000"}).status_code == 200


def test_cross_site_posts_are_refused(client: TestClient, filled: str) -> None:
    r = client.post("/studies/ties-done/stop", headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    with Store(filled) as store:
        assert store.stop_request("ties-done") is None


def test_oversized_bodies_are_refused(client: TestClient) -> None:
    big = "x" * (1 << 20 + 1)
    assert client.post("/new", data={"yaml": big}).status_code == 413

    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"y" * 65536

    assert client.post("/new", content=chunks()).status_code == 413


@pytest.mark.parametrize(
    "url",
    [
        "/new?config=../../etc/passwd",
        "/new?config=..",
        "/new?config=%2Fetc%2Fpasswd",
        "/studies/ties-done/logs/..%2F..%2F..%2Fetc%2Fpasswd",
        "/studies/..%2F..%2Fetc/logs/passwd",
    ],
)
def test_paths_from_requests_cannot_escape(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert r.status_code in (400, 404)
    assert "root:" not in r.text


@pytest.mark.parametrize("folder", ["../escape", "/tmp/escape", "..", "a/b", ".hidden"])
def test_export_folder_cannot_escape(
    client: TestClient, dirs: dict[str, Path], folder: str
) -> None:
    r = client.post("/studies/ties-done/trials/5/export", data={"folder": folder})
    assert r.status_code == 400
    assert not list(dirs["runs"].rglob("*.log"))
    assert not (dirs["exports"].parent / "escape").exists()


@pytest.mark.postgres
def test_the_start_up_line_hides_the_storage_password(pg_url: str) -> None:
    """PostgreSQL here trusts any password: the real dashboard starts, and must not print it."""
    url = sa.make_url(pg_url).set(password="s3cret-pw").render_as_string(hide_password=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", "dashboard", "--port", str(port), "--storage", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
    )
    try:
        line = proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "evomerge dashboard on" in line and "***" in line, line
    assert "s3cret-pw" not in line


def test_cli_refuses_a_public_bind_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVOMERGE_TOKEN", raising=False)
    result = CliRunner().invoke(cli, ["dashboard", "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "token" in result.output


# Charts


def test_thin_keeps_the_envelope_of_each_column() -> None:
    points = [(float(i), float((i * 7919) % 101)) for i in range(10_000)]
    kept = thin(points, 100)
    assert len(kept) <= 200
    assert max(p[1] for p in kept) == 100.0 and min(p[1] for p in kept) == 0.0


def test_best_so_far_and_ticks() -> None:
    assert best_so_far([(0, 1.0), (1, 0.5), (2, 2.0), (3, 2.0)]) == [(0, 1.0), (2, 2.0)]
    assert nice_ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(3.0, 3.0) == [3.0]


def test_pages_are_self_contained(client: TestClient) -> None:
    """Offline clusters: every asset is served by the dashboard itself."""
    for url in ("/", "/studies/ties-done", "/studies/ties-done/trials/3", "/best", "/new"):
        page = client.get(url).text
        assert not re.search(r'(src|href)="(https?:)?//', page), url
    assert client.get("/static/dashboard.js").status_code == 200
    json.dumps(client.get("/static/style.css").text)
