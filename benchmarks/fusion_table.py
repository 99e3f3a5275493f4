"""FuseLLM on the toy zoo: the held-out table of the fused target against the CLM-only
control, the target before and every source, for MinCE and AvgCE, exact and MinED alignment.

python -m benchmarks.fusion_table

Runs configs/fusion/demo.yaml through `evomerge fuse` (building the zoo's fusion part if
missing) once per fusion function and alignment, and once with --control, into a temporary
database, then prints each job's held-out scores.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from storage import Store

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fusion" / "demo.yaml"
SKILLS = ("upper", "translate", "add", "reverse")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        url = f"sqlite:///{root / 'fuse.db'}"
        base = yaml.safe_load(CONFIG.read_text())
        runs = {}
        for fusion in ("min_ce", "avg_ce"):
            for alignment in ("exact", "mined"):
                name = f"fuse-{fusion}-{alignment}"
                data = {**base, "name": name, "fusion": fusion, "alignment": alignment}
                runs[name] = (data, ())
        runs["control"] = ({**base, "name": "control"}, ("--control",))
        for name, (data, extra) in runs.items():
            path = root / f"{name}.yaml"
            path.write_text(yaml.safe_dump({**data, "out": str(root / name)}))
            subprocess.run(
                [sys.executable, "-m", "evomerge.cli", "fuse", str(path), *extra, "--storage", url],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        store = Store(url)
        jobs = {j.name: j.evaluation for j in store.list_fusion_jobs()}
        first = next(iter(jobs.values()))
        rows = {"target before": first["target"]}
        rows |= {k: v for k, v in first.items() if k not in ("fused", "target")}
        rows |= {name: evaluation["fused"] for name, evaluation in jobs.items()}
        print("| model | " + " | ".join(SKILLS) + " | mean of upper, translate |")
        print("|---" * (len(SKILLS) + 2) + "|")
        for name, m in rows.items():
            cells = " | ".join(f"{m[s]:.3f}" for s in SKILLS)
            print(f"| {name} | {cells} | {(m['upper'] + m['translate']) / 2:.3f} |")


if __name__ == "__main__":
    main()
