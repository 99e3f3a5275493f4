"""Storage errors, and the translation of driver errors into messages a user can act on.

Callers catch `StorageError`; the subclasses say what went wrong (bad URL, locked, not
migrated, busy study) without the caller parsing driver messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError


class StorageError(RuntimeError):
    """Base of every error the store raises on purpose."""


class StorageUnavailableError(StorageError):
    """The URL is malformed, names an unknown driver, or the database cannot be opened."""


class StorageLockedError(StorageError):
    """Another connection held a lock longer than the busy timeout; nothing was changed."""


class SchemaError(StorageError):
    """The evomerge tables are missing or newer than this code: run `Store.migrate()`."""


class StudyExistsError(StorageError):
    """`create_study` was given a name that is already taken."""


class UnknownStudyError(StorageError, LookupError):
    """No study of that name."""


class UnknownTrialError(StorageError, LookupError):
    """No trial of that number in the study (it was never recorded as started)."""


class StudyBusyError(StorageError):
    """Another live run (fresh heartbeat) already drives the study."""


class LeaseLostError(StorageError):
    """This run is no longer running: another run declared it dead and took the study over."""


_SQLITE_LOCKED = ("database is locked", "database table is locked")
_PG_LOCK_NOT_AVAILABLE = "55P03"
_PG_UNDEFINED_TABLE = "42P01"


@contextmanager
def translated(url: str, busy_timeout_s: float, *, connecting: bool = False) -> Iterator[None]:
    """Re-raise driver errors that have a known cause as `StorageError`s naming the URL.

    With `connecting`, any other driver error means the database cannot be opened at all.
    """
    try:
        yield
    except DBAPIError as e:
        err = _classify(e, url, busy_timeout_s)
        if err is None and (connecting or e.connection_invalidated):
            err = StorageUnavailableError(f"cannot open storage {url}: {_first_line(e)}")
        if err is None:
            raise
        raise err from e


def _first_line(e: DBAPIError) -> str:
    text = str(e.orig).strip()
    return text.splitlines()[0] if text else type(e.orig).__name__


def _classify(e: DBAPIError, url: str, busy_timeout_s: float) -> StorageError | None:
    msg = _first_line(e)
    sqlstate = getattr(e.orig, "sqlstate", None)
    if any(s in msg for s in _SQLITE_LOCKED) or sqlstate == _PG_LOCK_NOT_AVAILABLE:
        return StorageLockedError(
            f"storage {url} is locked: another connection held a lock for more than "
            f"{busy_timeout_s:g} s ({msg}). Nothing was changed; retry when it is done "
            "(SQLite allows one writer at a time; use PostgreSQL for many writers)."
        )
    if "evomerge_" in msg and ("no such table" in msg or sqlstate == _PG_UNDEFINED_TABLE):
        return SchemaError(f"storage {url} has no evomerge tables ({msg}); call Store.migrate()")
    if "file is not a database" in msg:
        return StorageUnavailableError(f"storage {url} is not a SQLite database file ({msg})")
    if "readonly database" in msg:
        return StorageUnavailableError(f"storage {url} is read-only ({msg}); nothing was changed")
    if "unable to open database file" in msg:
        return StorageUnavailableError(f"cannot open storage {url}: {msg}")
    return None
