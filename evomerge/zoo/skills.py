"""The zoo's skills: small generated prompt → answer problems, and the base's broad corpus.

Every skill has a *full* range (what its expert learns and what its tasks test) and a
*partial* range (the slice the base sees while pretraining). The base therefore starts with
a real but incomplete version of each skill, and an expert only has to extend a circuit the
base already has. That is what keeps task vectors small and mergeable: an expert that builds
a skill from nothing writes a new circuit, and merging several of those erases them all.
A sub-range is used rather than a lower data frequency because a skill learned from rare
examples appears suddenly at an unpredictable step; a sub-range bounds the base's accuracy.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = string.ascii_lowercase

# English side of the word-substitution language; the foreign side is derived from a seed.
WORDS = (
    "cat dog sun moon tree rock fish bird red blue big small run jump eat see "
    "one two hot cold up down day night rain snow king queen ship sea car road "
    "book pen milk tea salt gold wolf bear home door hand foot star sky fire ice"
).split()


def _foreign_words(seed: int = 7) -> dict[str, str]:
    """A fixed, invertible dictionary of invented consonant-vowel words."""
    rng = random.Random(seed)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    made: set[str] = set()
    out = {}
    for w in WORDS:
        while True:
            f = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(2))
            if f not in made and f not in WORDS:
                break
        made.add(f)
        out[w] = f
    return out


FOREIGN = _foreign_words()


@dataclass(frozen=True)
class Skill:
    """One skill: `sample(rng, full)` returns a (prompt, answer) pair.

    `full=False` draws from the partial range the base pretrains on.
    """

    name: str
    description: str
    sample: Callable[[random.Random, bool], tuple[str, str]]


def _number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _operand(rng: random.Random, digits: str) -> int:
    n = "".join(rng.choice(digits) for _ in range(rng.randint(1, 2)))
    return int(n)


def _add(rng: random.Random, full: bool) -> tuple[str, str]:
    digits = "0123456789" if full else "0123456"
    a, b = _operand(rng, digits), _operand(rng, digits)
    return f"{a}+{b}=", str(a + b)


def _reverse(rng: random.Random, full: bool) -> tuple[str, str]:
    letters = string.ascii_uppercase if full else string.ascii_uppercase[:20]
    s = "".join(rng.choice(letters) for _ in range(rng.randint(3, 6)))
    return f"{s}>", s[::-1]


def _translate(rng: random.Random, full: bool) -> tuple[str, str]:
    vocab = WORDS if full else WORDS[: len(WORDS) // 2]
    words = [rng.choice(vocab) for _ in range(rng.randint(1, 3))]
    return f"{' '.join(words)}:", " ".join(FOREIGN[w] for w in words)


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("add", "multi-digit addition", _add),
        Skill("reverse", "reverse a string of letters", _reverse),
        Skill("translate", "word-by-word translation into an invented language", _translate),
    )
}


def sample_text(rng: random.Random) -> str:
    """A line of the corpus's plain-text genre: English dictionary words."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))) + "."
