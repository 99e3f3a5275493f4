"""A lease (a study's run, a fusion job): the heartbeat that keeps it, and whether the
process that holds it is still alive."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psutil

from storage.errors import LeaseLostError

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Calls `beat` (a store's heartbeat for one lease) every `interval` seconds for as long
    as the process lives.

    A thread, not the caller's loop: starting workers (loading sources) or training between
    checkpoints can take minutes, and a lease silent meanwhile would look dead and let a
    second process take over.
    """

    def __init__(self, beat: Callable[[], None], interval: float, what: str) -> None:
        super().__init__(name=f"heartbeat of {what}", daemon=True)
        self.beat, self.interval, self.what = beat, interval, what
        self.lost: LeaseLostError | None = None
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                self.beat()
            except LeaseLostError as e:
                self.lost = e
                return
            except Exception as e:  # a transient database error: the next beat retries
                log.warning("heartbeat of %s failed: %s", self.what, e)

    def check(self) -> None:
        """Raise `LeaseLostError` in the caller if another process took the lease over."""
        if self.lost is not None:
            raise self.lost

    def stop(self) -> None:
        self._done.set()
        self.join()


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host: one that exited and was not reaped yet (a
    zombie, as a container's init may leave it) is gone; one we may not signal is alive."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
