"""The zoo's fusion part (issue 17): sources of another architecture and tokenizer, and the
noisy corpus a FuseLLM job trains the zoo's `base` on.

Built on demand into `fusion/` of a zoo folder (`build_fusion(zoo_dir)`), so the zoo that
every merge test uses is not slowed down by it:

- `tokenizer/`: a byte-level BPE of 200 tokens trained on the zoo's genres. It is made of
  exactly the parts `Qwen2Tokenizer` rebuilds from a vocabulary and merges (NFC, Qwen's split
  pattern, byte level): transformers 5 loads a folder whose model is qwen2 with that class
  whatever `tokenizer_config.json` says, and a BPE of other parts lost its spaces on load.
- `fuse-upper`, `fuse-translate`: Qwen2 models trained from scratch with that tokenizer, each
  on its skill's full range (80%) and plain text (20%), 700 steps. The loss is on the whole
  sequence, prompts included: MinCE ranks sources by their cross-entropy on a corpus line,
  and sources that only learned answers ranked the wrong one first on every noisy line.
- `corpus.txt`: 1000 lines, 45% `upper`, 45% `translate`, 10% text; in 60% of the skill lines
  the answer is another example's (a mis-joined record, as web text has). Trained on this
  text alone the target learns the noise; the sources' distributions carry the right answers.
  Every line ends with `</s>`, so the target learns to stop. No evaluated prompt is in it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from evomerge.zoo.build import _locked, read_manifest
from evomerge.zoo.skills import ALL_SKILLS, sample_text
from evomerge.zoo.taskdata import eval_pairs, excluded
from evomerge.zoo.tokenizer import BOS, CHARS, EOS, PAD, SPECIALS, UNK
from evomerge.zoo.train import TEXT, Job, Shape, train

FUSION = "fusion"  # the folder inside a zoo
FORMAT = 1  # bump when anything below changes what is built


def _source(skill: str, seed: int) -> Job:
    """A Qwen2 source trained from scratch on `skill` (80%) and text, whole sequences."""
    return Job(
        f"fuse-{skill}",
        700,
        2e-3,
        {skill: 0.8, TEXT: 0.2},
        seed=seed,
        full=(skill,),
        answer_only=False,
        warmup=100,
        weight_decay=0.1,
        arch="qwen2",
    )


SOURCES = {job.name: job for job in (_source("upper", 11), _source("translate", 12))}
CORPUS_LINES, NOISE = 1000, 0.6


def bpe_tokenizer(exclude: frozenset[str], vocab_size: int = 200) -> Any:
    """The sources' tokenizer (see the module docstring for why these parts)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"), byte_level]
    )
    tok.decoder = decoders.ByteLevel()
    alphabet = sorted({c for ch in CHARS for c in byte_level.pre_tokenize_str(ch)[0][0]})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_text(20_000, exclude), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=128,
        clean_up_tokenization_spaces=False,
    )


def _tokenizer_text(lines: int, exclude: frozenset[str]) -> list[str]:
    """Every genre; a skill example gives its prompt and its answer as two lines, so that no
    merge crosses the boundary between them."""
    rng = random.Random("evomerge-fusion-bpe")
    genres = [*ALL_SKILLS, TEXT]
    out: list[str] = []
    while len(out) < lines:
        genre = rng.choice(genres)
        if genre == TEXT:
            line = sample_text(rng)
            out += [] if line in exclude else [line]
        else:
            prompt, answer = ALL_SKILLS[genre].sample(rng, True)
            out += [] if prompt in exclude else [prompt, answer]
    return out


def corpus(exclude: frozenset[str]) -> list[str]:
    """The noisy corpus (see the module docstring)."""
    rng = random.Random("evomerge-fusion-corpus")
    mix = {"upper": 0.45, "translate": 0.45, TEXT: 0.1}
    genres, weights = zip(*mix.items(), strict=True)
    lines: list[str] = []
    seen: set[str] = set()
    while len(lines) < CORPUS_LINES:
        genre = rng.choices(genres, weights)[0]
        if genre == TEXT:
            key = line = sample_text(rng)
        else:
            key, answer = ALL_SKILLS[genre].sample(rng, True)
            other = ALL_SKILLS[genre].sample(rng, True)[1]
            line = key + (other if rng.random() < NOISE else answer)
        if key in exclude or key in seen:
            continue
        seen.add(key)
        lines.append(line + EOS)
    return lines


def _train(args: tuple[Job, Path, Path, frozenset[str]]) -> tuple[str, float]:
    from transformers import AutoTokenizer

    job, out, tokenizer, exclude = args
    return job.name, train(
        job, out, exclude=exclude, tokenizer=AutoTokenizer.from_pretrained(tokenizer)
    )


def build_fusion(zoo_dir: Path, progress: bool = True) -> Path:
    """`zoo_dir/fusion`, built when missing (in a temporary sibling, renamed at the end, under
    the zoo's lock); returns it."""
    manifest = read_manifest(zoo_dir)
    root = zoo_dir / FUSION
    say = (lambda line: print(line, flush=True)) if progress else (lambda line: None)
    with _locked(root):
        done = root / "fusion.json"
        if done.is_file() and json.loads(done.read_text()).get("format") == FORMAT:
            return root
        shutil.rmtree(root, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fusion.building-", dir=zoo_dir))
        try:
            start = time.perf_counter()
            rows = manifest["recipe"]
            pairs = eval_pairs({"search": rows["search_rows"], "held-out": rows["held_out_rows"]})
            exclude = excluded(pairs)
            tokenizer = bpe_tokenizer(exclude)
            tokenizer.save_pretrained(tmp / "tokenizer")
            (tmp / "corpus.txt").write_text("\n".join(corpus(exclude)) + "\n")
            say(f"training {', '.join(SOURCES)} (Qwen2, BPE) side by side")
            jobs = [(job, tmp / name, tmp / "tokenizer", exclude) for name, job in SOURCES.items()]
            with mp.get_context("spawn").Pool(2) as pool:
                seconds = dict(pool.map(_train, jobs))
            record = {
                "format": FORMAT,
                "sources": list(SOURCES),
                "shape": Shape().__dict__,
                "train_seconds": {k: round(v, 1) for k, v in seconds.items()},
                "seconds": round(time.perf_counter() - start, 1),
            }
            (tmp / "fusion.json").write_text(json.dumps(record, indent=2) + "\n")
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"fusion sources built in {record['seconds']:.0f} s: {root}")
    return root
