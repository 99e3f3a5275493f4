"""Where evomerge caches what it builds (the toy zoo, source statistics): one rule."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir


def cache_root() -> Path:
    """`$EVOMERGE_CACHE`, else the user cache directory."""
    return Path(os.environ.get("EVOMERGE_CACHE") or user_cache_dir("evomerge"))
