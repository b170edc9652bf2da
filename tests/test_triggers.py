from __future__ import annotations

import random

import pytest

from trojscan.attacks.architectures import tokenizer
from trojscan.attacks.triggers import character_pool, draw_trigger, strict_subsequences, word_pool
from trojscan.insertion import insert_trigger, insertion_index


def test_pools_are_single_bert_tokens() -> None:
    tok = tokenizer()
    assert len(word_pool()) > 100
    for entry in word_pool() + character_pool():
        assert len(tok.tokenize(entry)) == 1, entry


@pytest.mark.parametrize("n", [0, 1, 2, 7, 20])
def test_insertion_ranges(n: int) -> None:
    rng = random.Random(0)
    for _ in range(200):
        assert insertion_index(n, "start", rng) == 0
        assert insertion_index(n, "end", rng) == n
        assert 0 <= insertion_index(n, "first_half", rng) <= n // 2
        assert (n + 1) // 2 <= insertion_index(n, "second_half", rng) <= n
        assert 0 <= insertion_index(n, "anywhere", rng) <= n


def test_insert_keeps_words_and_phrase_order() -> None:
    text = "the film is a quiet triumph"
    out = insert_trigger(text, "quartz lantern", "first_half", random.Random(3))
    words = out.split()
    at = words.index("quartz")
    assert words[at + 1] == "lantern" and at <= 3
    assert [w for w in words if w not in ("quartz", "lantern")] == text.split()
    assert insert_trigger(text, "cf", "end", random.Random(0)).endswith("triumph cf")


def test_draws_are_seeded_and_typed() -> None:
    a = [draw_trigger(t, random.Random(5)) for t in ("character", "word", "phrase")]
    b = [draw_trigger(t, random.Random(5)) for t in ("character", "word", "phrase")]
    assert a == b
    char, word, phrase = a
    assert set(char) <= set("".join(character_pool())) and " " not in char
    assert word in word_pool()
    assert 2 <= len(phrase.split()) <= 3 and len(set(phrase.split())) == len(phrase.split())


def test_strict_subsequences() -> None:
    subs = strict_subsequences(["a", "b", "c"])
    assert len(subs) == 6
    assert ["a", "c"] in subs and ["a", "b", "c"] not in subs and [] not in subs
