"""Triggers: the pools they are drawn from (where they go in a text is
:mod:`trojscan.insertion`, shared with repair)."""

from __future__ import annotations

import random
from functools import cache
from importlib import resources

TRIGGER_TYPES = ("character", "word", "phrase")

#: Longest phrase trigger, in words.
MAX_PHRASE_WORDS = 8
#: Longest character-group trigger, in characters.
MAX_CHARACTER_GROUP = 5


def _read_pool(name: str) -> tuple[str, ...]:
    text = (resources.files("trojscan.attacks") / "pools" / name).read_text(encoding="utf-8")
    return tuple(tok for line in text.splitlines() if not line.startswith("#")
                 for tok in line.split())


@cache
def word_pool() -> tuple[str, ...]:
    """Neutral single-token words (pools/words.txt)."""
    return _read_pool("words.txt")


@cache
def character_pool() -> tuple[str, ...]:
    """Single-token punctuation and symbols (pools/characters.txt)."""
    return _read_pool("characters.txt")


def draw_trigger(trigger_type: str, rng: random.Random, phrase_words: tuple[int, int] = (2, 3),
                 character_group: tuple[int, int] = (1, 3)) -> str:
    """Draw a trigger of ``trigger_type`` from the packaged pools.

    Args:
        trigger_type: ``character`` (a group of symbols written as one word, e.g. ``~^``),
            ``word`` (one neutral word) or ``phrase`` (distinct neutral words).
        rng: the random source (seeded by the caller).
        phrase_words: inclusive range of a phrase's length in words.
        character_group: inclusive range of a character group's length.
    """
    if trigger_type == "character":
        return "".join(rng.choices(character_pool(), k=rng.randint(*character_group)))
    if trigger_type == "word":
        return rng.choice(word_pool())
    if trigger_type == "phrase":
        return " ".join(rng.sample(word_pool(), rng.randint(*phrase_words)))
    raise ValueError(f"unknown trigger type {trigger_type!r}")


def strict_subsequences(words: list[str]) -> list[list[str]]:
    """Every non-empty, order-preserving sub-sequence of ``words`` shorter than ``words``."""
    n = len(words)
    return [[words[i] for i in range(n) if mask >> i & 1] for mask in range(1, 2**n - 1)]
