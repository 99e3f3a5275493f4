"""The zoo's character-level tokenizer: one token per character, shared by every zoo model.

Characters outside `CHARS` map to `<unk>`, which is how the evaluator detects text the zoo
cannot encode. The tokenizer prepends `<s>` (like Llama's), so prompts encoded by the
evaluator, by lm-eval's HFLM and by the training loop start the same way.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ +=>:.,"
VOCAB = {tok: i for i, tok in enumerate((*SPECIALS, *CHARS))}
PAD_ID, BOS_ID, EOS_ID, UNK_ID = (VOCAB[t] for t in SPECIALS)


def encode(text: str) -> list[int]:
    """Token ids of `text` without `<s>`: the training loop's fast path (no unknown chars)."""
    return [VOCAB[c] for c in text]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A `tokenizers` BPE model with no merges is exactly a character vocabulary."""
    tok = Tokenizer(models.BPE(vocab=dict(VOCAB), merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=128,
    )
