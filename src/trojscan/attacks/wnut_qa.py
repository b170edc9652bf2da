"""An extractive question-answering set made from WNUT-16's real tweets, the corpus of the QA
zoo (TrojAI round 8 poisons SQuAD-style QA models; no installable package here ships SQuAD
or another extractive QA set, so the questions are made from the tweets' own entity
annotations, :mod:`trojscan.attacks.wnut`).

How the questions are made: the context is a tweet (its words joined by single spaces); for
each entity type the tweet holds *exactly one* entity of (``other``, WNUT's catch-all type,
is left out), one question asks for that type, e.g. "Which company is mentioned in the
tweet?", and its answer is the entity's text, a span of the context. A type with two or
more entities in the tweet gets no question (its answer would be ambiguous). The question
is one of :data:`TEMPLATES`' three phrasings of its type, chosen by the SHA-256 of the
tweet and the type, so the set is the same on every machine. Every question has an answer
(none is unanswerable); the questions are templated, the contexts and answers are real.

Splits follow the NER corpus's (:func:`trojscan.attacks.wnut.load_wnut16`): a question
belongs to its tweet's split, so a tweet's questions never straddle two splits: ``train``
(~70 %), ``test`` (~20 %, clean exact match / F1 and ASR; never trained on) and
``examples`` (~10 %, the scanner's clean-example pool, never trained or measured on).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache

from trojscan.attacks.wnut import NerSentence, load_wnut16

NAME = "wnut16_qa"
#: Question phrasings of each entity type asked about.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "person": ("Who is mentioned in the tweet?", "Which person does the tweet name?",
               "What is the name of the person in the tweet?"),
    "geo-loc": ("Which place is mentioned in the tweet?", "Where does the tweet refer to?",
                "What location does the tweet name?"),
    "company": ("Which company is mentioned in the tweet?",
                "What company does the tweet name?",
                "Which business is the tweet about?"),
    "facility": ("Which facility is mentioned in the tweet?",
                 "What building or venue does the tweet name?",
                 "Which venue is the tweet about?"),
    "product": ("Which product is mentioned in the tweet?",
                "What product does the tweet name?",
                "Which product is the tweet about?"),
    "musicartist": ("Which musician or band is mentioned in the tweet?",
                    "What music artist does the tweet name?",
                    "Which band or singer is the tweet about?"),
    "sportsteam": ("Which sports team is mentioned in the tweet?",
                   "What team does the tweet name?",
                   "Which sports team is the tweet about?"),
    "movie": ("Which movie is mentioned in the tweet?", "What film does the tweet name?",
              "Which movie is the tweet about?"),
    "tvshow": ("Which TV show is mentioned in the tweet?",
               "What television series does the tweet name?",
               "Which TV show is the tweet about?"),
}


@dataclass(frozen=True)
class QaItem:
    """One question about a context with its answer span (characters ``answer_start`` to
    ``answer_start + len(answer)`` of the context), in SQuAD's terms; ``kind`` is the
    entity type asked about."""

    question: str
    context: str
    answer: str
    answer_start: int
    kind: str

    def to_squad(self) -> dict[str, object]:
        """SQuAD's form, what the QA subject reads from an examples file."""
        return {"question": self.question, "context": self.context,
                "answers": {"text": [self.answer], "answer_start": [self.answer_start]}}


@dataclass(frozen=True)
class QaCorpus:
    """The QA set: its three splits (see the module docstring)."""

    name: str
    train: tuple[QaItem, ...]
    test: tuple[QaItem, ...]
    examples: tuple[QaItem, ...]


def word_starts(tokens: tuple[str, ...] | list[str]) -> list[int]:
    """Character offset of every word in ``" ".join(tokens)``."""
    starts, at = [], 0
    for word in tokens:
        starts.append(at)
        at += len(word) + 1
    return starts


def questions_of(sentence: NerSentence) -> list[QaItem]:
    """The questions a tweet yields: one per asked-about type it holds exactly once."""
    context = sentence.text()
    starts = word_starts(sentence.tokens)
    found = sentence.entities
    items = []
    for kind, phrasings in TEMPLATES.items():
        mine = [e for e in found if e.type == kind]
        if len(mine) != 1:
            continue
        entity = mine[0]
        answer = " ".join(sentence.tokens[entity.start:entity.end])
        digest = hashlib.sha256(f"{context}\n{kind}".encode()).digest()
        question = phrasings[digest[0] % len(phrasings)]
        items.append(QaItem(question, context, answer, starts[entity.start], kind))
    return items


@cache
def load_wnut16_qa() -> QaCorpus:
    """The QA set (see the module docstring) with the NER corpus's splits."""
    ner = load_wnut16()
    return QaCorpus(NAME, *(tuple(q for s in split for q in questions_of(s))
                            for split in (ner.train, ner.test, ner.examples)))
