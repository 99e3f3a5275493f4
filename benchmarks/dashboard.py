"""Dashboard responsiveness on a big study: the study page against the studies list.

python -m benchmarks.dashboard [--trials 10000] [--repeat 20]

Fills a SQLite store with one study of `--trials` trials (the study and its run through the
Store API, the trials by one bulk insert into the same table `Store.record_trial_*` writes),
plus a few small studies, then times each page in-process (routing, queries, SVG and HTML
rendering; no network). The study page must stay within a small factor of the list page,
whatever the study's size: its table is paged and its charts are downsampled.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from fastapi.testclient import TestClient

from evomerge.dashboard import create_app
from evomerge.dashboard.sample import fill_study, ps_recipe, scores
from storage import Store
from storage.db import make_engine, transaction
from storage.schema import studies, trials

BIG = "big"


def bulk_fill(url: str, n: int) -> None:
    """A study of `n` finished trials over ten simulated hours, 1 in 13 failed."""
    rng = random.Random(0)
    with Store(url) as store:
        store.migrate()
        for i in range(3):
            fill_study(store, f"small-{i}", 40, seed=i)
        fill_study(store, BIG, 0, budget=n, end=None)
        run_id = store.runs(BIG)[0].id
    t0 = datetime.now(UTC) - timedelta(hours=10)
    step = timedelta(hours=10) / n
    recipes = [ps_recipe(rng) for _ in range(64)]  # the table's size, not its variety, matters
    engine = make_engine(url)
    with transaction(engine, write=True) as conn:
        study_id = conn.execute(sa.select(studies.c.id).where(studies.c.name == BIG)).scalar()
        rows = []
        for number in range(n):
            recipe = recipes[number % len(recipes)]
            failed = number % 13 == 12
            s = scores(rng, number)
            rows.append(
                {
                    "study_id": study_id,
                    "run_id": run_id,
                    "number": number,
                    "generation": number // 16,
                    "state": "FAIL" if failed else "COMPLETE",
                    "attempts": 1,
                    "method": recipe.method,
                    "recipe_json": recipe.to_json(),
                    "recipe_hash": recipe.hash,
                    "metrics": None if failed else s.metrics,
                    "fitness": None if failed else s.fitness,
                    "build_seconds": 0.5,
                    "eval_seconds": 2.0,
                    "worker": f"worker-{number % 4}",
                    "error": "RuntimeError: NaN logits" if failed else None,
                    "started_at": t0 + step * number,
                    "finished_at": t0 + step * (number + 0.9),
                }
            )
        conn.execute(sa.insert(trials), rows)
    engine.dispose()


def timed(client: TestClient, url: str, repeat: int) -> float:
    """Median seconds of `repeat` GETs of `url` (after one warm-up)."""
    assert client.get(url).status_code == 200, url
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        response = client.get(url)
        samples.append(time.perf_counter() - t)
        assert response.status_code == 200
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        t = time.perf_counter()
        bulk_fill(url, args.trials)
        print(f"filled {args.trials} trials in {time.perf_counter() - t:.1f} s")
        app = create_app(url, run_dir=Path(tmp) / "runs", export_dir=Path(tmp) / "exports")
        pages = {
            "studies list": "/",
            "study page": f"/studies/{BIG}",
            "study live fragment": f"/studies/{BIG}/live",
            "study page, sorted by fitness, page 200": f"/studies/{BIG}?sort=fitness&page=200",
            "trial page": f"/studies/{BIG}/trials/{args.trials // 2}",
            "best recipes (top 20)": "/best",
        }
        with TestClient(app, base_url="http://127.0.0.1") as client:
            results = {name: timed(client, path, args.repeat) for name, path in pages.items()}
            size = len(client.get(pages["study page"]).content)
    base = results["studies list"]
    print(f"median of {args.repeat} requests, {args.trials} trials in the big study:")
    for name, seconds in results.items():
        print(f"  {name:42s} {seconds * 1000:8.1f} ms  {seconds / base:5.1f}x the list")
    print(f"study page: {size / 1024:.0f} KiB of HTML")
    print(f"ratio study page / studies list: {results['study page'] / base:.2f}")


if __name__ == "__main__":
    main()
