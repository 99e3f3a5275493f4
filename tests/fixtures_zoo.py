"""The test-size toy zoo, built once into the user cache and reused by every test run.

`task_arithmetic` is a ten-line merge (base + λ·Σ task vectors) for the zoo's own tests;
the real merge engine is `evomerge.merge`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

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


def task_arithmetic(base: Path, experts: list[Path], weight: float) -> LlamaForCausalLM:
    """base + weight · Σ (expert − base), tensor by tensor."""
    model = AutoModelForCausalLM.from_pretrained(base)
    merged = model.state_dict()
    start = {k: v.clone() for k, v in merged.items()}
    for path in experts:
        expert = AutoModelForCausalLM.from_pretrained(path).state_dict()
        with torch.no_grad():
            for k, v in merged.items():
                v += weight * (expert[k] - start[k])
    return model.eval()
