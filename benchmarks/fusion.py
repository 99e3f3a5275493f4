"""FuseLLM throughput: tokens a second of the distribution pass and of training, in this
process and on 1 and 2 Ray workers.

python -m benchmarks.fusion [--lines 2000] [--steps 60]

The models are demo-zoo-shaped (hidden 128, 4 layers) Qwen2 source and Llama target with
the zoo's character tokenizer, randomly initialised (throughput does not depend on what they
learned); the corpus is the zoo's skills and text, generated. Every figure is printed with
its ratio to the in-process run measured in the same run. Ray's start-up (a few seconds) is
inside the Ray figures, as a user pays it.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from evomerge.fusion.distributions import distributions, load
from evomerge.fusion.job import FusionConfig, prepare, train, train_on_ray
from evomerge.zoo.skills import ALL_SKILLS, sample_text
from evomerge.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB, build_tokenizer
from storage import Store

SHAPE = dict(
    vocab_size=len(VOCAB),
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
    tie_word_embeddings=False,
)


def models(root: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    out = []
    for name, config in (("target", LlamaConfig(**SHAPE)), ("source", Qwen2Config(**SHAPE))):
        folder = root / name
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        build_tokenizer().save_pretrained(folder)
        out.append(folder)
    return out[0], out[1]


def corpus(root: Path, lines: int) -> Path:
    rng = random.Random(0)
    skills = list(ALL_SKILLS.values())
    text = []
    for i in range(lines):
        if i % 3 == 0:
            text.append(sample_text(rng))
        else:
            prompt, answer = rng.choice(skills).sample(rng, True)
            text.append(prompt + answer)
    path = root / "corpus.txt"
    path.write_text("\n".join(text) + "\n")
    return path


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["EVOMERGE_CACHE"] = str(root / "cache")
        target, source = models(root)
        text = corpus(root, args.lines)
        tokens = sum(len(t) for t, _, _ in load(distributions(source, text, 10)))
        print(f"corpus: {args.lines} lines, {tokens} source tokens; one torch thread a process")
        passes = {}
        for workers in (0, 1, 2):
            os.environ["EVOMERGE_CACHE"] = str(root / f"cache{workers}")
            passes[workers] = timed(lambda w=workers: distributions(source, text, 10, workers=w))
        base = passes[0]
        for workers, seconds in passes.items():
            where = "in process" if workers == 0 else f"{workers} Ray worker(s)"
            print(
                f"distribution pass, {where}: {tokens / seconds:,.0f} tokens/s "
                f"({base / seconds:.2f}x in process)"
            )
        cfg = FusionConfig(
            name="bench",
            target=str(target),
            sources=(str(source),),
            corpus=str(text),
            train={"steps": args.steps, "batch": 16, "checkpoint_every": args.steps},
            workers=0,
        )
        examples = prepare(cfg)
        per_step = 16 * sum(len(e.tokens) for e in examples) / len(examples)
        url = f"sqlite:///{root / 'bench.db'}"
        Store(url).migrate()
        runs = {0: timed(lambda: train(cfg, examples, root / "train0"))}
        for workers in (1, 2):
            job = cfg.model_copy(update={"name": f"bench{workers}", "workers": workers})
            Store(url).create_fusion_job(job.name, job.to_yaml(), str(root / job.name))
            runs[workers] = timed(lambda j=job: train_on_ray(j, examples, root / j.name, url))
        for workers, seconds in runs.items():
            where = "in process" if workers == 0 else f"Ray Train, {workers} worker(s)"
            rate = per_step * args.steps / seconds
            print(f"training, {where}: {rate:,.0f} tokens/s ({runs[0] / seconds:.2f}x in process)")


if __name__ == "__main__":
    main()
