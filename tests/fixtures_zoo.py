"""The test-size toy zoo, built once into the user cache and reused by every test run."""

from pathlib import Path

import pytest

from evomerge.zoo import build_zoo


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    return build_zoo("test", progress=False)
