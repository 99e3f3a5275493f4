"""Screenshots of every dashboard page into docs/img/, for the README.

    .venv/bin/python scripts/screenshots.py                      # sample studies
    .venv/bin/python scripts/screenshots.py --storage sqlite:///evomerge.db  # a real database
    .venv/bin/python scripts/screenshots.py --storage URL --dfs-study S --pages trial-dfs

Uses the system Chromium headless; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from evomerge.dashboard import create_app
from evomerge.dashboard.sample import CHROMIUM, CHROMIUM_ARGS, config_yaml, fill_study, serving
from storage import Store

ROOT = Path(__file__).resolve().parents[1]


def sample_storage(folder: Path) -> str:
    url = f"sqlite:///{folder / 'sample.db'}"
    with Store(url) as store:
        store.migrate()
        fill_study(store, "ties-arith-reverse", 160, budget=200, end=None)
        fill_study(store, "linear-baseline", 60, method="linear", seed=3, end="stopped")
        fill_study(store, "dfs-path", 40, method="dataflow", seed=2)
    return url


def targets(url: str, dfs_study: str | None = None) -> dict[str, str]:
    """Page name -> path: the biggest study, its best trial, a DFS trial (the best of
    `dfs_study`, else of any study), a comparison."""
    with Store(url) as store:
        studies = store.list_studies()
        big = max(studies, key=lambda s: s.trials_done).name
        best = store.best(big, top=2)
        by = "heldout" if dfs_study else "fitness"
        dfs = store.best(dfs_study, top=1, method="dataflow", by=by)
    pages = {"studies": "/", "new-study": "/new", "study": f"/studies/{big}", "best": "/best"}
    pages["similarity"] = f"/studies/{big}/similarity"  # its models must be on this machine
    if best:
        pages["trial"] = f"/studies/{big}/trials/{best[0].number}"
    if dfs:
        pages["trial-dfs"] = f"/studies/{dfs[0].study}/trials/{dfs[0].number}"
    if len(best) == 2:
        pages["compare"] = f"/compare?pick={big}:{best[0].number}&pick={big}:{best[1].number}"
    return pages


def shoot(page: Page, base: str, path: str, out: Path) -> None:
    page.goto(base + path)
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(out), full_page=True)
    print(f"{out}  <- {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", help="study database (default: sample studies)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--dfs-study", help="the study whose best trial is trial-dfs.png")
    parser.add_argument("--pages", nargs="+", help="only these pages (default: every one)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        url = args.storage or sample_storage(folder)
        (folder / "configs").mkdir()
        (folder / "configs" / "demo.yaml").write_text(config_yaml("demo"))
        app = create_app(
            url,
            configs_dir=ROOT / "configs" if args.storage else folder / "configs",
            export_dir=folder / "exports",
            run_dir=folder / "runs",
        )
        with serving(app) as base, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS))
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            for name, path in targets(url, args.dfs_study).items():
                if args.pages is None or name in args.pages:
                    shoot(page, base, path, args.out / f"{name}.png")
            if args.pages is not None and "new-study-errors" not in args.pages:
                browser.close()
                return
            page.goto(base + "/new")
            text = re.sub(r"high: [\d.]+", "high: -1", page.input_value("#yaml"), count=1)
            page.fill("#yaml", re.sub(r"count: \d+", "count: 0", text))
            page.click("button.primary")
            page.screenshot(path=str(args.out / "new-study-errors.png"), full_page=True)
            print(f"{args.out / 'new-study-errors.png'}  <- POST /new")
            browser.close()


if __name__ == "__main__":
    main()
