"""FuseLLM knowledge fusion (issue 17; Wan et al. 2024, "Knowledge Fusion of Large Language
Models"): source LMs' top-k next-token distributions over a corpus, moved onto the target's
tokenisation and vocabulary, fused, and used to train the target.

What exists so far (a fusion job is not yet in the store, the dashboard or on Ray):

- `distributions`: each source's top-k distributions over a corpus, computed once and cached
  on disk by the model's content, the corpus, k and the length limit.
- `fuse`: MinCE and AvgCE, per sequence, over the union of the sources' tokens.
- `job`: `FusionConfig` (validated; bad input refused before anything is written),
  `prepare` (distributions, alignment, fusion per corpus line) and `train` (λ·L_CLM +
  (1 - λ)·L_fusion, deterministic batches, checkpoints that resume to the same weights).

- `align`: token alignment. `align_tokens` (edit-distance alignment of two tokenisations of the
  same text, exact or MinED pairing), `VocabMapping` (source id -> target id: identical string,
  else minimum edit distance, memoised), `align_distributions` (per target token, the paired
  source token's top-k distribution in target ids, or a one-hot on the gold token),
  `shift_causal` (a causal LM's "row i predicts token i + 1" output to the "row i predicted
  token i" convention used here) and `normalize_token` ("Ġ"/"▁" word-start markers made to
  agree).
"""

from evomerge.fusion.align import (
    VocabMapping,
    align_distributions,
    align_tokens,
    normalize_token,
    shift_causal,
)

__all__ = [
    "VocabMapping",
    "align_distributions",
    "align_tokens",
    "normalize_token",
    "shift_causal",
]
