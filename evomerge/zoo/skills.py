"""The zoo's skills: small generated prompt → answer problems, and the base's plain text.

Two properties make the experts of this zoo mergeable at a scale of one million parameters;
both were found by measurement (hidden 128, 4 layers, task arithmetic of three experts):

1. *The base already has part of every skill.* Each skill has a full range (what its expert
   learns and its tasks test) and a partial range (the slice the base pretrains on), so the
   base starts with a working but incomplete skill (about 0.3 accuracy) and an expert only
   extends a circuit that exists. Experts that learned their skill from nothing built new
   circuits, and no merge of them kept much of any skill. A sub-range is used rather than
   a lower data frequency because rare examples make a skill appear suddenly at an
   unpredictable step, while a sub-range bounds the base's accuracy.
2. *Each skill extends along its own symbols.* Addition is on digits and the expert adds
   the operand digits 7-9; reversal is on capital letters and the expert adds U-Z;
   translation is on lower-case words and the expert adds the second half of the
   dictionary. When the extensions shared one alphabet and differed in length (3-digit
   sums, longer strings, sorting), the sum of three task vectors scored a mean of 0.52
   against 0.68 for the best expert (four vectors: 0.12, below the base): each expert had
   rewired the same positional circuits, and adding a random vector of the same norms did
   no harm, so the damage was that shared structure, not the size of the vectors. With
   disjoint symbols, task arithmetic of the three experts keeps most of every skill (held-
   out mean 0.74 against 0.55 for the best single model, demo size).

`CROSS_SKILLS` are the cross-skill zoo's (`evomerge.zoo.cross`): `add`, reading numbers
written in foreign numerals (one letter per digit), and addition asked in those numerals,
the task that needs both.

`STRANGER_SKILLS` are the second family's (the stranger's, from another initialisation):
upper-casing lower-case letters, which no model of the first family is trained on, so the
stranger's expert brings a skill the first family lacks. The first family's jobs mix only
`SKILLS`, so adding skills here leaves their training untouched; `ALL_SKILLS` is both.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

# English side of the word-substitution language; the foreign side is derived from a seed.
# fmt: off
WORDS = [
    "cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird", "red", "blue", "big", "small",
    "run", "jump", "eat", "see", "one", "two", "hot", "cold", "up", "down", "day", "night",
    "rain", "snow", "king", "queen", "ship", "sea", "car", "road", "book", "pen", "milk", "tea",
    "salt", "gold", "wolf", "bear", "home", "door", "hand", "foot", "star", "sky", "fire", "ice",
]
# fmt: on


def _foreign_words(seed: int = 7) -> dict[str, str]:
    """A fixed, invertible dictionary of invented consonant-vowel words."""
    rng = random.Random(seed)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    out: dict[str, str] = {}
    for w in WORDS:
        while True:
            f = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(2))
            if f not in out.values() and f not in WORDS:
                break
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


def _operand(rng: random.Random, digits: str) -> int:
    return int("".join(rng.choice(digits) for _ in range(rng.randint(1, 2))))


def _add(rng: random.Random, full: bool) -> tuple[str, str]:
    digits = string.digits if full else string.digits[:7]
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
        Skill("add", "addition of 1-2 digit numbers", _add),
        Skill("reverse", "reverse a string of capital letters", _reverse),
        Skill("translate", "word-by-word translation into an invented language", _translate),
    )
}


def _upper(rng: random.Random, full: bool) -> tuple[str, str]:
    letters = string.ascii_lowercase if full else string.ascii_lowercase[:20]
    s = "".join(rng.choice(letters) for _ in range(rng.randint(3, 6)))
    return f"{s},", s.upper()


STRANGER_SKILLS: dict[str, Skill] = {
    s.name: s for s in (Skill("upper", "upper-case a string of lower-case letters", _upper),)
}

ALL_SKILLS: dict[str, Skill] = {**SKILLS, **STRANGER_SKILLS}


def _numeral_letters(seed: int = 11) -> list[str]:
    """Ten lower-case letters, the foreign language's digits 0-9."""
    return random.Random(seed).sample("bdfghjklmnpqrstvwxz", 10)


NUMERALS = _numeral_letters()


def foreign(n: int, rng: random.Random | None = None, letters: str = string.digits) -> str:
    """`n` in foreign numerals (47 → "lq"); with `rng`, code-switched: each digit of `letters`
    foreign or not, evenly ("4q"), the others as digits."""
    return "".join(
        NUMERALS[int(d)] if rng is None or (d in letters and rng.random() < 0.5) else d
        for d in str(n)
    )


def _numerals(rng: random.Random, full: bool) -> tuple[str, str]:
    """Read a code-switched number of 1-3 digits (1-2 would leave too few for the evaluation
    splits); the base knows the foreign words for 0-6 only."""
    n = int("".join(rng.choice(string.digits) for _ in range(rng.randint(1, 3))))
    return f"{foreign(n, rng, string.digits if full else string.digits[:7])}:", str(n)


def _foreign_add(rng: random.Random, full: bool) -> tuple[str, str]:
    """`add` asked in foreign numerals; the partial range is code-switched."""
    digits = string.digits if full else string.digits[:7]
    a, b = _operand(rng, digits), _operand(rng, digits)
    mixed = None if full else rng
    return f"{foreign(a, mixed)}+{foreign(b, mixed)}=", str(a + b)


CROSS_SKILLS: dict[str, Skill] = {
    "add": SKILLS["add"],
    **{
        s.name: s
        for s in (
            Skill("numerals", "read a number written partly in foreign numerals", _numerals),
            Skill("foreign_add", "addition asked in foreign numerals", _foreign_add),
        )
    },
}

# Every skill a training job can name: both families' and the cross-skill zoo's.
ANY_SKILL: dict[str, Skill] = {**ALL_SKILLS, **CROSS_SKILLS}


def sample_text(rng: random.Random) -> str:
    """A line of the corpus's plain-text genre: English dictionary words."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))) + "."
