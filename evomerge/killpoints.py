"""Crash injection: SIGKILL this process at a named step, to test that resume repairs it.

`EVOMERGE_KILL_AT=NAME` (or `NAME:N`, the N-th time the step is reached, default 1) makes
`kill_point(NAME)` send SIGKILL to its own process: a real, unannounced death, with no
`finally` run and nothing flushed. Unset, a kill point costs one dictionary lookup. The
points are one line each in the coordinator and the CLI; `KILL_POINTS` lists them in the
order a trial passes them, and the crash-window tests walk that list.
"""

from __future__ import annotations

import os
import signal

ENV = "EVOMERGE_KILL_AT"
KILL_POINTS = (
    "asked",  # Optuna created the trial (RUNNING, params set); evomerge has no row yet
    "recorded",  # evomerge's row is RUNNING; nothing submitted
    "submitted",  # a worker has the recipe
    "stored",  # the result is in evomerge's row; Optuna's trial is still RUNNING
    "told",  # both stores agree
    "heldout-stored",  # one held-out re-score stored, the others not
    "stage-1-finished",  # PS+DFS: stage 1 ended, stage 2 not yet registered
)
# A fusion job's (evomerge.fusion.job), in the order a training step passes them.
FUSION_KILL_POINTS = (
    "fusion-step",  # an optimizer step done, its checkpoint (if one is due) not yet written
    "fusion-swap",  # the old checkpoint renamed aside, the new one not yet in its place
)
_seen: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process if `EVOMERGE_KILL_AT` names this step (and its count is due)."""
    wanted = os.environ.get(ENV)
    if not wanted or wanted.partition(":")[0] != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= int(wanted.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)
