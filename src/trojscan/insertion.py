"""Putting a text trigger into a text, at the word level, before tokenisation.

Both sides use it: the zoo builder stamps its poisoned training texts, and repair stamps
clean texts with an inverted trigger. Insertion works on white-space separated words, the
way TrojAI and BadNL stamp their triggers:

* ``start`` / ``end``: before the first word / after the last;
* ``first_half``: at a uniformly drawn word boundary in ``[0, n // 2]``;
* ``second_half``: at a uniformly drawn word boundary in ``[ceil(n / 2), n]``;
* ``anywhere``: at a uniformly drawn word boundary in ``[0, n]``.
"""

from __future__ import annotations

import random

INSERTIONS = ("start", "end", "first_half", "second_half", "anywhere")


def insertion_index(n_words: int, insertion: str, rng: random.Random) -> int:
    """Word boundary (0..n_words) at which a trigger is inserted."""
    if insertion == "start":
        return 0
    if insertion == "end":
        return n_words
    if insertion == "first_half":
        return rng.randint(0, n_words // 2)
    if insertion == "second_half":
        return rng.randint((n_words + 1) // 2, n_words)
    if insertion == "anywhere":
        return rng.randint(0, n_words)
    raise ValueError(f"unknown insertion {insertion!r}")


def insert_trigger(text: str, trigger: str, insertion: str, rng: random.Random) -> str:
    """``text`` with ``trigger`` (one or more words) inserted as :data:`INSERTIONS` says."""
    words = text.split()
    at = insertion_index(len(words), insertion, rng)
    return " ".join(words[:at] + trigger.split() + words[at:])
