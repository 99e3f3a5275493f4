"""The test-size toy zoo, built once into the user cache and reused by every test run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from evomerge.zoo import build_zoo


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    return build_zoo("test", progress=False)


@pytest.fixture(scope="module")
def tokenizer(zoo_dir: Path):
    """The test zoo's tokenizer (every model of the zoo shares it)."""
    return AutoTokenizer.from_pretrained(zoo_dir / "base")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matrices: on a shared 2-core machine a second thread makes scoring 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
