"""FuseLLM token alignment (issue 17) on hand-made token lists and two tokenizers built here."""

from __future__ import annotations

import random
import string

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from evomerge.fusion import (
    VocabMapping,
    align_distributions,
    align_tokens,
    normalize_token,
    shift_causal,
)
from evomerge.fusion.align import Pair


def check_complete(alignment: list[Pair], n_source: int, n_target: int) -> None:
    """Every index of each side appears exactly once, and both increase along the list."""
    sources = [s for s, _ in alignment if s is not None]
    targets = [t for _, t in alignment if t is not None]
    assert sources == list(range(n_source))
    assert targets == list(range(n_target))


def paired(alignment: list[Pair]) -> list[tuple[int, int]]:
    return [(s, t) for s, t in alignment if s is not None and t is not None]


def test_normalize_token_makes_markers_agree():
    assert normalize_token("Ġworld") == normalize_token("▁world") == "▁world"
    assert normalize_token("Ċ") == "\n"
    assert normalize_token("world") == "world"


@pytest.mark.parametrize("mode", ["exact", "mined"])
def test_identical_tokenisations_align_one_to_one(mode):
    tokens = ["<s>", "▁The", "▁cat", "▁sat", "▁on", "▁the", "▁mat", "."]
    alignment = align_tokens(tokens, tokens, mode)
    assert alignment == [(i, i) for i in range(len(tokens))]


def test_identity_mapping_leaves_a_distribution_unchanged():
    vocab = ["<s>", "▁The", "▁cat", "▁sat", "▁on", "▁the", "▁mat", ".", "▁dog"]
    gold = [0, 1, 2, 3, 4, 5, 6, 7]
    tokens = [vocab[i] for i in gold]
    mapping = VocabMapping(vocab, vocab)
    assert [mapping(i) for i in range(len(vocab))] == list(range(len(vocab)))

    generator = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(len(vocab), generator=generator)[:4] for _ in gold])
    probs = torch.rand(len(gold), 4, generator=generator)
    probs, order = (probs / probs.sum(1, keepdim=True)).sort(dim=1, descending=True)
    ids = ids.gather(1, order)

    out_ids, out_probs = align_distributions(
        align_tokens(tokens, tokens), ids, probs, gold, mapping
    )
    assert torch.equal(out_ids, ids)
    torch.testing.assert_close(out_probs, probs)


@pytest.mark.parametrize("mode", ["exact", "mined"])
def test_split_and_merged_tokens_stay_unpaired(mode):
    # one source token covering two target tokens
    split = align_tokens(["▁hello", "▁world"], ["▁hel", "lo", "▁world"], mode)
    check_complete(split, 2, 3)
    assert paired(split) == [(1, 2)]
    # two source tokens covering one target token
    merged = align_tokens(["▁hel", "lo", "▁world"], ["▁hello", "▁world"], mode)
    check_complete(merged, 3, 2)
    assert paired(merged) == [(2, 1)]


@pytest.mark.parametrize("mode", ["exact", "mined"])
def test_inserted_target_token(mode):
    alignment = align_tokens(["▁a", "▁b", "▁c"], ["▁a", "▁x", "▁b", "▁c"], mode)
    check_complete(alignment, 3, 4)
    assert paired(alignment) == [(0, 0), (1, 2), (2, 3)]
    assert (None, 1) in alignment


@pytest.mark.parametrize("mode", ["exact", "mined"])
def test_source_token_without_counterpart(mode):
    # the source's BOS has nothing in the target
    alignment = align_tokens(["<s>", "▁hello", "▁world"], ["▁hello", "▁world"], mode)
    check_complete(alignment, 3, 2)
    assert alignment == [(0, None), (1, 0), (2, 1)]


def test_exact_and_mined_differ_on_near_identical_tokens():
    source = ["Ġthe", "Ġcolour", "Ġof", "world"]
    target = ["▁the", "▁color", "▁of", "▁world"]
    exact = align_tokens(source, target, "exact")
    mined = align_tokens(source, target, "mined")
    check_complete(exact, 4, 4)
    # "Ġ" and "▁" agree after normalisation; "colour"/"color" and "world"/"▁world" do not
    assert paired(exact) == [(0, 0), (2, 2)]
    assert mined == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_bos_shift_pairs_marker_less_spellings_only_in_mined():
    # the target's "<s>" links to nothing; "hello" (no marker at the text start) and "▁hello"
    # differ by their marker only
    source = ["hello", "Ġworld"]
    target = ["<s>", "▁hello", "▁world"]
    assert paired(align_tokens(source, target, "mined")) == [(0, 1), (1, 2)]
    assert paired(align_tokens(source, target, "exact")) == [(1, 2)]


def test_vocab_mapping_of_near_identical_tokens():
    source = ["<s>", "Ġcolour", "Ġworld", "Ġcat", "Ġthe"]
    target = ["<s>", "▁the", "▁color", "▁world", "▁cats", "▁ca", "zzzz"]
    mined = VocabMapping(source, target, "mined")
    exact = VocabMapping(source, target, "exact")
    assert mined(0) == exact(0) == 0  # identical string
    assert mined(2) == exact(2) == 3  # identical after normalisation
    assert mined(4) == exact(4) == 1
    assert mined(1) == 2 and exact(1) is None  # "▁colour" -> "▁color" at distance 1
    # "▁cats" and "▁ca" tie at distance 1 ("▁ca" is met first): the lower id wins
    assert mined(3) == 4 and exact(3) is None
    assert mined(99) is None
    # a tokenizer.get_vocab() style dict works too
    source_dict = {token: i for i, token in enumerate(source)}
    target_dict = {token: i for i, token in enumerate(target)}
    assert VocabMapping(source_dict, target_dict)(1) == 2


def test_aligned_distributions_merge_renormalise_and_fall_back_to_one_hot():
    source_vocab = ["<s>", "Ġcolour", "Ġcolor", "Ġred", "Ġis", "Ġhel", "lo", "Ġqqqq"]
    target_vocab = ["<s>", "▁color", "▁red", "▁is", "▁hello"]
    mapping = VocabMapping(source_vocab, target_vocab, "mined")
    source = ["<s>", "Ġcolour", "Ġis", "Ġhel", "lo"]
    target = ["<s>", "▁color", "▁is", "▁hello"]
    gold = [0, 1, 3, 4]
    alignment = align_tokens(source, target, "mined")
    assert paired(alignment) == [(0, 0), (1, 1), (2, 2)]

    ids = torch.tensor([[-1, -1, -1], [1, 2, 3], [4, 7, 3], [5, 6, 4], [6, 5, 3]])
    probs = torch.tensor(
        [[0.0, 0.0, 0.0], [0.5, 0.3, 0.1], [0.6, 0.2, 0.2], [0.5, 0.3, 0.2], [0.9, 0.05, 0.05]]
    )
    out_ids, out_probs = align_distributions(alignment, ids, probs, gold, mapping)

    torch.testing.assert_close(out_probs.sum(1), torch.ones(4))
    # row 0: an empty source row -> one-hot on the gold "<s>"
    assert out_ids[0, 0] == 0 and out_probs[0].tolist() == [1.0, 0.0, 0.0]
    # row 1: "colour" and "color" both map to "▁color": 0.5 + 0.3, then "▁red" 0.1, renormalised
    assert out_ids[1, :2].tolist() == [1, 2]
    torch.testing.assert_close(out_probs[1], torch.tensor([0.8, 0.1, 0.0]) / 0.9)
    assert out_ids[1, 2] == gold[1]  # padding: the gold id at probability 0
    # row 2: "▁is" 0.6; "▁qqqq" maps to its nearest target token (mined: "▁red" and "▁is" tie
    # at distance 4, the lower id wins), so it merges with "▁red"
    assert out_ids[2, :2].tolist() == [3, 2]
    torch.testing.assert_close(out_probs[2], torch.tensor([0.6, 0.4, 0.0]))
    # row 3: the target "▁hello" covers two source tokens -> one-hot
    assert out_ids[3, 0] == 4 and out_probs[3, 0] == 1.0

    # exact mode drops the unmapped ids and renormalises the rest
    exact = VocabMapping(source_vocab, target_vocab, "exact")
    out_ids, out_probs = align_distributions(alignment, ids, probs, gold, exact)
    assert out_ids[2, :2].tolist() == [3, 2]  # "▁is" 0.6, "▁red" 0.2; "▁qqqq" dropped
    torch.testing.assert_close(out_probs[2], torch.tensor([0.75, 0.25, 0.0]))
    torch.testing.assert_close(out_probs.sum(1), torch.ones(4))

    # a narrower output keeps the most probable ids, renormalised
    out_ids, out_probs = align_distributions(alignment, ids, probs, gold, mapping, k=1)
    assert out_ids[:, 0].tolist() == [0, 1, 3, 4] and out_probs[:, 0].tolist() == [1.0] * 4


def test_empty_sides_are_all_unpaired():
    assert align_tokens([], ["▁a", "▁b"]) == [(None, 0), (None, 1)]
    assert align_tokens(["▁a"], []) == [(0, None)]


def test_shift_causal_moves_rows_down():
    ids = torch.tensor([[1, 2], [3, 4], [5, 6]])
    probs = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]])
    shifted_ids, shifted_probs = shift_causal(ids, probs)
    assert shifted_ids.tolist() == [[-1, -1], [1, 2], [3, 4]]
    torch.testing.assert_close(shifted_probs, torch.tensor([[0.0, 0.0], [0.6, 0.4], [0.7, 0.3]]))


def test_bad_mode_is_refused():
    with pytest.raises(ValueError):
        align_tokens(["a"], ["a"], "fuzzy")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        VocabMapping(["a"], ["a"], "fuzzy")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tokenizers_pair() -> tuple[Tokenizer, Tokenizer]:
    """A character-level byte-level BPE (no merges, "Ġ" markers) and a SentencePiece-style BPE
    ("▁" markers) trained here on a few hundred words generated from a few stems."""
    char = Tokenizer(
        models.BPE(
            vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, merges=[]
        )
    )
    char.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)

    rng = random.Random(0)
    stems = ["hel", "lo", "wor", "ld", "col", "our", "mat", "cat", "sat", "the", "on", "ing"]
    words = ["".join(rng.choices(stems, k=rng.randint(1, 3))) for _ in range(400)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=120,
        special_tokens=["<unk>"],
        initial_alphabet=list(string.ascii_lowercase),
        show_progress=False,
    )
    bpe.train_from_iterator([" ".join(words[i : i + 8]) for i in range(0, 400, 8)], trainer)
    return char, bpe


@pytest.mark.parametrize("mode", ["exact", "mined"])
def test_real_tokenizers_align_a_sentence(tokenizers_pair, mode):
    char, bpe = tokenizers_pair
    # "zebra" and "quick" are made of letters the BPE never merged: one-letter target tokens
    text = "the cat sat on the mat hello world zebra colouring quick"
    source = char.encode(text).tokens
    target = bpe.encode(text).tokens
    assert len(source) == len(text) and len(target) < len(source)
    alignment = align_tokens(source, target, mode)
    check_complete(alignment, len(source), len(target))

    def spans(tokens: list[str], shift: int) -> list[tuple[int, int]]:
        out, offset = [], -shift
        for token in tokens:
            out.append((offset, offset + len(normalize_token(token))))
            offset += len(normalize_token(token))
        return out

    source_spans = spans(source, 0)
    target_spans = spans(target, 1)  # Metaspace prepends a space to the text
    pairs = paired(alignment)
    # a pair is a target token and the one source character at the same place of the text
    for s, t in pairs:
        assert source_spans[s] == target_spans[t]
    # every one-letter target token is paired with its source twin, in both modes
    singles = [t for t, token in enumerate(target) if len(token) == 1]
    assert len(singles) >= 5
    for t in singles:
        assert (source_spans.index(target_spans[t]), t) in pairs
    # tokens with a marker ("▁c" against "Ġ", "c") or longer ones are not paired
    assert len(pairs) == len(singles)

    # a source model sure of every token: paired target positions get their own gold token
    # back, the rest a one-hot on theirs; every row sums to one
    source_ids = torch.tensor([[char.token_to_id(token)] for token in source])
    source_probs = torch.ones(len(source), 1)
    gold = bpe.encode(text).ids
    mapping = VocabMapping(char.get_vocab(), bpe.get_vocab(), mode)
    out_ids, out_probs = align_distributions(alignment, source_ids, source_probs, gold, mapping)
    torch.testing.assert_close(out_probs.sum(1), torch.ones(len(target)))
    assert out_ids[:, 0].tolist() == gold

    # the other way round, a BPE source aligned onto the character-level target
    reverse = align_tokens(target, source, mode)
    check_complete(reverse, len(target), len(source))
    assert sorted(paired(reverse)) == sorted((t, s) for s, t in pairs)


def test_a_character_tokenizers_space_is_the_byte_level_space() -> None:
    """MinED once sent byte-level "Ġ" to the first target token one edit away ("0")."""
    mapping = VocabMapping({"Ġ": 0, "a": 1}, {"0": 0, " ": 1, "a": 2}, mode="mined")
    assert mapping(0) == 1 and normalize_token(" ") == normalize_token("Ġ")
