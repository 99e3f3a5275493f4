"""The dashboard in a real headless Chromium (the system's; nothing is downloaded).

The fast test walks a pre-filled store; the slow one starts the real demo search from the
New-study page, watches trials arrive, stops, resumes, opens the best trial and downloads
its mergekit YAML.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from playwright.sync_api import Browser, Page, expect, sync_playwright

from evomerge.cli.study import CONFIGS_DIR
from evomerge.dashboard import create_app
from evomerge.dashboard.sample import CHROMIUM, CHROMIUM_ARGS, fill_study, serving
from evomerge.recipe import Recipe
from storage import Store

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS))
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


@contextmanager
def serve(url: str, tmp_path: Path, configs_dir: Path) -> Iterator[str]:
    """The dashboard on `url`, served on a free loopback port; yields its base URL."""
    app = create_app(
        url, configs_dir=configs_dir, export_dir=tmp_path / "exports", run_dir=tmp_path / "runs"
    )
    with serving(app) as base:
        yield base


def test_walk_a_filled_store(page: Page, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    with Store(url) as store:
        store.migrate()
        fill_study(store, "watched", 40, budget=80, end=None)
        best = store.best("watched", top=1)[0]
    (tmp_path / "configs").mkdir()
    with serve(url, tmp_path, tmp_path / "configs") as base:
        page.goto(base)
        page.get_by_role("link", name="watched").click()
        expect(page.locator("#done")).to_have_text("37 / 80")  # 3 of 40 failed
        expect(page.locator("svg.chart")).to_have_count(2)

        # Live: a trial recorded by someone else appears without a reload.
        with Store(url) as store:
            run_id = store.runs("watched")[0].id
            recipe = Recipe.from_json(best.recipe_json)
            store.record_trial_started("watched", run_id, 40, 5, recipe, "worker-9")
            store.record_trial_finished("watched", 40, "COMPLETE", {"zoo:add": 1.0}, 0.99)
        expect(page.locator("#done")).to_have_text("38 / 80", timeout=10_000)
        expect(page.locator("#best")).to_have_text("0.9900")

        # A refresh that fails (the dashboard restarting) is said, and cleared once one works.
        live = re.compile(r"/studies/watched/live")
        page.route(live, lambda route: route.abort())
        expect(page.locator(".stale")).to_contain_text("Not live: last updated at")
        expect(page.locator(".stale")).to_contain_text("the dashboard did not answer")
        page.unroute(live)
        expect(page.locator(".stale")).to_be_hidden()

        page.get_by_role("link", name="fitness", exact=True).click()
        first = page.locator("#trials tbody tr").first.locator("td").first
        expect(first).to_have_text("40")
        page.get_by_role("link", name="number").click()

        page.get_by_role("button", name="Stop").click()
        expect(page.locator(".note")).to_contain_text("Stop requested")
        expect(page).to_have_url(re.compile(r"sort=number&desc=0"))  # still sorted so
        expect(page.locator("#stop-request")).to_have_text("(stop requested)")

        page.goto(f"{base}/studies/watched/trials/{best.number}")
        expect(page.locator("svg.heatmap")).to_have_count(2)
        with page.expect_download() as download:
            page.locator("#download-json").click()
        saved = Path(download.value.path()).read_text()
        assert Recipe.model_validate(json.loads(saved)) == Recipe.from_json(best.recipe_json)


def test_config_errors_point_at_their_line(page: Page, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    text = "name: broken\nbase: zoo:base\nsources: [zoo:a]\nmethod: ties\nsearch: {}\n"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "broken.yaml").write_text(text)
    with serve(url, tmp_path, tmp_path / "configs") as base:
        page.goto(f"{base}/new")
        page.select_option("select[name=config]", "broken.yaml")
        expect(page.locator("#yaml")).to_have_value(text)
        page.get_by_role("button", name="Start").click()
        errors = page.locator(".errors li")
        expect(errors.filter(has_text="search")).to_contain_text("line 5")
        expect(errors.filter(has_text="fitness")).to_have_count(1)
        errors.filter(has_text="search").get_by_role("link").click()
        selected = page.evaluate(
            "() => { const t = document.getElementById('yaml');"
            " return t.value.slice(t.selectionStart, t.selectionEnd); }"
        )
        assert selected == "search: {}"


@pytest.mark.slow
def test_demo_search_from_start_to_export(page: Page, tmp_path: Path, zoo_dir: Path) -> None:
    """The whole loop: a real coordinator, real merges, real scores.

    It starts `configs/demo.yaml` edited in the page, as a user would, to use the test-size
    zoo and a budget too large to finish (trials take a fraction of a second), so that every
    Stop lands while trials are running.
    """
    from mergekit.config import MergeConfiguration

    url = f"sqlite:///{tmp_path / 'demo.db'}"
    with serve(url, tmp_path, CONFIGS_DIR) as base:
        page.goto(f"{base}/new?config=demo.yaml")
        demo = page.input_value("#yaml")
        edited = re.sub(r"budget: \{trials: \d+", "budget: {trials: 5000", demo)
        page.fill("#yaml", edited.replace("zoo: demo", "zoo: test"))
        page.fill("input[name=name]", "browser-demo")
        page.get_by_role("button", name="Start").click()
        expect(page).to_have_url(re.compile(r"/studies/browser-demo"), timeout=30_000)
        outcomes = page.locator("#outcomes")
        expect(outcomes).not_to_have_text(re.compile(r"^0 ·"), timeout=300_000)

        page.get_by_role("button", name="Stop").click()
        expect(page.locator("#status")).to_have_text("stopped", timeout=300_000)
        stopped_at = outcomes.inner_text()
        expect(page.locator("#runs tbody tr")).to_have_count(1)

        page.get_by_role("button", name="Resume").click()
        expect(page.locator(".note")).to_contain_text("Resume started")
        expect(page.locator("#runs tbody tr")).to_have_count(2, timeout=120_000)
        expect(outcomes).not_to_have_text(stopped_at, timeout=300_000)
        page.get_by_role("button", name="Stop").click()
        expect(page.locator("#status")).to_have_text("stopped", timeout=300_000)

        page.get_by_role("link", name="Best recipes").click()
        page.locator("#best tbody tr").first.locator("td").nth(2).get_by_role("link").click()
        expect(page.locator("svg.heatmap")).to_have_count(1)  # task arithmetic: weight
        with page.expect_download() as download:
            page.locator("#download-yaml").click()
        config = yaml.safe_load(Path(download.value.path()).read_text())
        merge = MergeConfiguration.model_validate(config)
        assert merge.merge_method == "task_arithmetic" and merge.slices
