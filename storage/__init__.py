"""The SQL side of evomerge: studies, runs and trials beside Optuna's tables.

store = Store(default_storage_url())
store.migrate()
"""

from storage.db import default_storage_url
from storage.errors import (
    LeaseLostError,
    SchemaError,
    StorageError,
    StorageLockedError,
    StorageUnavailableError,
    StudyBusyError,
    StudyExistsError,
    UnknownStudyError,
    UnknownTrialError,
)
from storage.records import (
    REASKED,
    RUN_INTERRUPTED,
    FusionJobInfo,
    RunInfo,
    StudyInfo,
    StudySummary,
    TrialRow,
    is_reasked,
)
from storage.store import Store

__all__ = [
    "REASKED",
    "RUN_INTERRUPTED",
    "FusionJobInfo",
    "LeaseLostError",
    "RunInfo",
    "SchemaError",
    "StorageError",
    "StorageLockedError",
    "StorageUnavailableError",
    "Store",
    "StudyBusyError",
    "StudyExistsError",
    "StudyInfo",
    "StudySummary",
    "TrialRow",
    "UnknownStudyError",
    "UnknownTrialError",
    "default_storage_url",
    "is_reasked",
]
