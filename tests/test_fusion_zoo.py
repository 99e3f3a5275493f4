"""The toy zoo's fusion part and FuseLLM's claim on it: fused beats the CLM-only control."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from evomerge.fitness import Evaluator
from evomerge.zoo.fusion import SOURCES, build_fusion
from evomerge.zoo.tokenizer import CHARS
from storage import Store
from tests.test_coordinator import _evomerge

CONFIG = Path(__file__).parents[1] / "configs" / "fusion" / "demo.yaml"
pytestmark = pytest.mark.slow  # the fusion part trains two models (about 2.5 min)


@pytest.fixture(scope="module")
def fusion_dir(zoo_dir: Path) -> Path:
    return build_fusion(zoo_dir, progress=False)


def test_sources_have_another_architecture_tokenizer_and_their_skill(zoo_dir, fusion_dir):
    target = AutoTokenizer.from_pretrained(zoo_dir / "base")
    for name, job in SOURCES.items():
        folder = fusion_dir / name
        assert AutoConfig.from_pretrained(folder).model_type == "qwen2"
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.get_vocab() != target.get_vocab()
        ids = tok(CHARS)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == CHARS  # encodes the zoo's text
        assert len(tok("cat dog moon")["input_ids"]) < len(target("cat dog moon")["input_ids"])
        skill = job.full[0]
        evaluator = Evaluator([f"zoo:{skill}"], split="held-out", zoo_dir=zoo_dir)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert evaluator.score(model, tok).metrics[skill] >= 0.8, name


def test_the_fused_target_beats_the_clm_only_control(zoo_dir, fusion_dir, tmp_path):
    """configs/fusion/demo.yaml and its control through the CLI: on held-out, the fused
    target beats the control on the mean of the sources' skills and by .15 on upper, which
    the target lacked."""
    url = f"sqlite:///{tmp_path / 'fuse.db'}"
    env = {**os.environ, "EVOMERGE_STORAGE": url, "COLUMNS": "300"}
    text = CONFIG.read_text().replace("checkpoint_every: 50}", "checkpoint_every: 50}\nout: OUT")
    config = tmp_path / "demo.yaml"
    config.write_text(text.replace("OUT", str(tmp_path / "out")))
    for extra in ((), ("--control",)):
        proc = _evomerge("fuse", str(config), *extra, env=env)
        out, _ = proc.communicate(timeout=1200)
        assert proc.returncode == 0, out
    store = Store(url)
    fused = store.fusion_job("demo-fuse").evaluation
    control = store.fusion_job("demo-fuse-clm").evaluation
    print(json.dumps({"fused": fused, "control": control}, indent=1))
    mean = {
        n: (e["fused"]["upper"] + e["fused"]["translate"]) / 2
        for n, e in (("f", fused), ("c", control))
    }
    assert mean["f"] > mean["c"]
    assert fused["fused"]["upper"] >= control["fused"]["upper"] + 0.15
    assert fused["target"]["upper"] < 0.05  # the target lacked it
