"""Tiny randomly initialised checkpoint families (a base and fine-tuned-like sources).

Each family is a base model saved with `save_pretrained` plus sources that are the base with
a seeded perturbation of every tensor (about 10% of its scale), which is what fine-tuned
relatives look like to a merge: close to the base, different from each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from evomerge.models import SourceSet

VOCAB = 96
_SHAPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    bos_token_id=2,
    eos_token_id=3,
    pad_token_id=1,
)
CONFIGS: dict[str, PretrainedConfig] = {
    "llama": LlamaConfig(**_SHAPE, tie_word_embeddings=False),
    "mistral": MistralConfig(**_SHAPE, tie_word_embeddings=False, sliding_window=16),
    "qwen2": Qwen2Config(**_SHAPE, tie_word_embeddings=True),
    # Architectures evomerge knows nothing of: q/k norms, post-norms, fused projections,
    # scaled embeddings, sliding layers; found from the model (evomerge.layout).
    "qwen3": Qwen3Config(**_SHAPE, head_dim=8, tie_word_embeddings=True),
    "gemma2": Gemma2Config(**_SHAPE, head_dim=8, sliding_window=16),
    "gemma3_text": Gemma3TextConfig(**_SHAPE, head_dim=8, sliding_window=16),
    "phi3": Phi3Config(**_SHAPE, tie_word_embeddings=False),
    "olmo2": Olmo2Config(**_SHAPE, tie_word_embeddings=False),
}
CORE = ("llama", "mistral", "qwen2")  # the families every test runs on
MORE = tuple(sorted(set(CONFIGS) - set(CORE)))  # the families tests/test_architectures.py adds


@dataclass(frozen=True)
class Family:
    """Checkpoint folders of one tiny model family."""

    arch: str
    base: Path
    sources: tuple[Path, ...]


def tiny_tokenizer(vocab: int = VOCAB, prefix: str = "w") -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with `vocab` entries (no download needed)."""
    words = ["[UNK]", "[PAD]", "<s>", "</s>"] + [f"{prefix}{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
    )


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict:
    """A fine-tuned-like copy: each tensor plus seeded noise at `scale` of its spread."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        spread = float(t.float().std()) if t.numel() > 1 and float(t.float().std()) > 0 else 0.2
        noise = torch.randn(t.shape, generator=g) * spread * scale
        out[name] = (t.float() + noise).to(t.dtype)
    return out


def save_model(
    config: PretrainedConfig,
    state: dict[str, torch.Tensor],
    out: Path,
    *,
    dtype: torch.dtype = torch.float32,
    shard_size: str | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> Path:
    """Save `state` as a Hugging Face checkpoint folder (config, safetensors, tokenizer)."""
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(state, strict=False)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out, **kwargs)
    (tokenizer or tiny_tokenizer()).save_pretrained(out)
    return out


def make_family(
    root: Path,
    arch: str,
    n_sources: int = 3,
    *,
    dtype: torch.dtype = torch.float32,
    shard_size: str | None = None,
    seed: int = 0,
    config: PretrainedConfig | None = None,
) -> Family:
    """Write a base and `n_sources` perturbed sources of `arch` (`config`, default its tiny
    config) under `root`."""
    config = config or CONFIGS[arch]
    torch.manual_seed(seed)
    base_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    base = save_model(config, base_state, root / "base", dtype=dtype, shard_size=shard_size)
    sources = tuple(
        save_model(
            config,
            perturbed(base_state, seed=seed * 100 + i + 1),
            root / f"source{i}",
            dtype=dtype,
            shard_size=shard_size,
        )
        for i in range(n_sources)
    )
    return Family(arch, base, sources)


@pytest.fixture(scope="session", params=CORE)
def tiny_family(request, tmp_path_factory) -> Family:
    """A float32 tiny family of each architecture (llama, mistral, qwen2 with tied embeddings)."""
    return make_family(tmp_path_factory.mktemp(f"tiny_{request.param}"), request.param)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Family:
    return make_family(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_llama_bf16_sharded(tmp_path_factory) -> Family:
    """bfloat16 weights split over several safetensors shards."""
    return make_family(
        tmp_path_factory.mktemp("tiny_llama_bf16"),
        "llama",
        n_sources=2,
        dtype=torch.bfloat16,
        shard_size="20KB",
        seed=1,
    )


NAMES = ("a", "b", "c")


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (sharded or not)."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(file))
    return state


def family_sources(family: Family) -> SourceSet:
    """A family loaded as a SourceSet: base "base", sources "a", "b", "c"."""
    return SourceSet.load(family.base, family.sources, names=NAMES, base_name="base")


def family_states(family: Family) -> dict[str, dict[str, torch.Tensor]]:
    """A family's checkpoints as state dicts, by model name."""
    folders = dict(zip(NAMES, family.sources, strict=True)) | {"base": family.base}
    return {name: load_state(folder) for name, folder in folders.items()}


@pytest.fixture(scope="session")
def tiny_sources(tiny_family) -> SourceSet:
    return family_sources(tiny_family)


@pytest.fixture(scope="session")
def tiny_states(tiny_family) -> dict[str, dict[str, torch.Tensor]]:
    return family_states(tiny_family)
