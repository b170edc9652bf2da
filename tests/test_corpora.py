from __future__ import annotations

from collections import Counter

import pytest

from trojscan.corpora import BBC_LABELS, load_corpus, normalise, split_of
from trojscan.errors import InputError


@pytest.mark.parametrize("name", ["rotten_tomatoes", "imdb", "bbc"])
def test_splits_are_disjoint_and_cover_every_label(name: str) -> None:
    corpus = load_corpus(name)
    texts = [{e.text for e in corpus.split(s)} for s in ("train", "test", "examples")]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    n = sum(len(t) for t in texts)
    # ~70 / 20 / 10 %, by hash
    assert 0.65 < len(corpus.train) / n < 0.75
    assert 0.15 < len(corpus.test) / n < 0.25
    for split in ("train", "test", "examples"):
        assert set(Counter(e.label for e in corpus.split(split))) == set(range(len(corpus.labels)))


def test_sizes_match_the_packages() -> None:
    rt = load_corpus("rotten_tomatoes")
    total = len(rt.train) + len(rt.test) + len(rt.examples)
    assert 8_400 < total <= 8_530  # 8,530 sentences less exact duplicates
    bbc = load_corpus("bbc")
    assert bbc.labels == BBC_LABELS
    assert 2_100 < len(bbc.train) + len(bbc.test) + len(bbc.examples) <= 2_225
    assert max(len(e.text.split()) for e in bbc.train) <= 64


def test_split_depends_on_text_only() -> None:
    assert split_of("a fine film") == split_of("a fine film")
    assert normalise("a <br /> b\n\t c", max_words=2) == "a b"


def test_unknown_corpus_and_label() -> None:
    with pytest.raises(InputError, match="unknown corpus"):
        load_corpus("sst5")
    with pytest.raises(InputError, match="no label 'neutral'"):
        load_corpus("rotten_tomatoes").label_index("neutral")
