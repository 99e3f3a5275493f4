"""FuseLLM throughput: tokens a second of the distribution pass and of training, in this
process and on 1 and 2 Ray workers.

python -m benchmarks.fusion [--lines 20000] [--steps 200]

The models are demo-zoo-shaped (hidden 128, 4 layers) Qwen2 source and Llama target with
the zoo's character tokenizer, randomly initialised (throughput does not depend on what they
learned); the corpus is the zoo's skills and text, generated. Every figure is printed with
its ratio to the in-process run measured in the same run. Ray's start-up (a few seconds) is
measured apart: each figure comes from a small and a big run, whose difference is the cost
of the work alone, and the rest is start-up (Ray's workers, loading the models).
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
from workers.pool import connect

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
    path = root / f"corpus-{lines}.txt"
    path.write_text("\n".join(text) + "\n")
    return path


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def steady(small: tuple[float, float], big: tuple[float, float]) -> tuple[float, float]:
    """(units a second once started, start-up seconds) from a small and a big run's
    (units, seconds): the difference cancels the fixed cost (Ray's workers, model loads)."""
    (u1, t1), (u2, t2) = small, big
    rate = (u2 - u1) / (t2 - t1)
    return rate, t1 - u1 / rate


def show(what: str, results: dict[int, tuple[float, float]], where: str) -> None:
    base = results[0][0]
    for workers, (rate, startup) in results.items():
        place = "in process" if workers == 0 else f"{workers} {where}"
        print(
            f"{what}, {place}: {rate:,.0f} tokens/s once started ({rate / base:.2f}x in "
            f"process), start-up {startup:.1f} s"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    connect(None, num_cpus=2)  # Ray's own start is not a fusion cost: started once, first
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        target, source = models(root)
        texts = {n: corpus(root, n) for n in (args.lines // 10, args.lines)}
        passes: dict[int, tuple[float, float]] = {}
        for workers in (0, 1, 2):
            os.environ["EVOMERGE_CACHE"] = str(root / f"warm-{workers}")  # Ray workers' imports
            distributions(source, texts[args.lines // 10], 10, workers=workers)
            runs = []
            for n, text in texts.items():
                os.environ["EVOMERGE_CACHE"] = str(root / f"cache-{workers}-{n}")
                seconds = timed(lambda t=text, w=workers: distributions(source, t, 10, workers=w))
                tokens = sum(len(t) for t, _, _ in load(distributions(source, text, 10)))
                runs.append((tokens, seconds))
            passes[workers] = steady(*runs)
        print(f"corpus: {args.lines} lines, {runs[-1][0]} source tokens; one torch thread a worker")
        show("distribution pass", passes, "Ray task(s)")
        url = f"sqlite:///{root / 'bench.db'}"
        Store(url).migrate()
        text = texts[args.lines]
        cfg = FusionConfig(
            name="bench", target=str(target), sources=(str(source),), corpus=str(text)
        )
        examples = prepare(cfg)
        per_step = 16 * sum(len(e.tokens) for e in examples) / len(examples)
        trains: dict[int, tuple[float, float]] = {}
        for workers in (0, 1, 2):
            runs = []
            for steps in (args.steps // 10, args.steps):
                job = cfg.model_copy(
                    update={
                        "name": f"bench-{workers}-{steps}",
                        "workers": workers,
                        "train": cfg.train.model_copy(
                            update={"steps": steps, "batch": 16, "checkpoint_every": steps}
                        ),
                    }
                )
                out = root / job.name
                if workers:
                    Store(url).create_fusion_job(job.name, job.to_yaml(), str(out))
                    seconds = timed(lambda j=job, o=out: train_on_ray(j, examples, o, url))
                else:
                    seconds = timed(lambda j=job, o=out: train(j, examples, o))
                runs.append((per_step * steps, seconds))
            trains[workers] = steady(*runs)
        show("training", trains, "Ray Train worker(s)")


if __name__ == "__main__":
    main()
