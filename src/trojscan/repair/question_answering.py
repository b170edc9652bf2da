"""Repair of extractive QA models (DBS Table 2's QA rows): the items are questions about a
context with their answer span, a trigger's words are inserted at a word boundary of the
question, of the context (outside the answer) or of both, as the scan inverted it, and the
goal stays the true answer (at its shifted offset); clean quality is SQuAD's F1, and attack
success is the share of held-out questions the model answers right that the trigger turns
into the backdoor's answer (no answer, or the trigger itself).

The consistency term compares span distributions: a stamped question's start and end
probabilities are asked to match the original model's on the question without the trigger,
token by token (a token is matched by its place in the unstamped text; the trigger's own
tokens have no teacher).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trojscan.finetune import FinetuneConfig, StepCallback
from trojscan.manifest import PlantedTrigger
from trojscan.repair.base import RESCAN_EXAMPLES, RepairTask
from trojscan.spans import (
    SpanGoal,
    encode_pairs,
    exact_match,
    f1_score,
    predict_answers,
    span_probabilities,
    train_spans,
)
from trojscan.subjects.extractive_qa import EMPTY, POSITIONS, QaExample

#: The two texts of a question, by their sequence id in a tokenised pair.
QUESTION, CONTEXT = 0, 1


@dataclass(frozen=True)
class Insertion:
    """Trigger text inserted into the question (``sequence`` 0) or the context (1): the
    ``width`` characters from offset ``at`` of the stamped text are the trigger's (with the
    space that joins it); the unstamped text's characters from ``at`` on moved by
    ``width``."""

    sequence: int
    at: int
    width: int


@dataclass(frozen=True)
class StampedQuestion:
    """A training question: the goal (question, context and answer, a trigger inserted or
    not) and where its trigger went."""

    goal: SpanGoal
    inserted: tuple[Insertion, ...] = ()

    @property
    def question(self) -> str:
        return self.goal.question

    @property
    def context(self) -> str:
        return self.goal.context


def word_boundaries(text: str) -> list[int]:
    """The character offsets where a word can be inserted: the start of every word, and the
    end of the text."""
    return [m.start() for m in re.finditer(r"\S+", text)] + [len(text)]


def insert_at(text: str, trigger: str, at: int) -> tuple[str, int]:
    """(``text`` with ``trigger`` inserted at the word boundary ``at``, the characters
    inserted): before a word the trigger and a space, at the end a space and the
    trigger."""
    if at >= len(text):
        return f"{text} {trigger}", len(trigger) + 1
    return f"{text[:at]}{trigger} {text[at:]}", len(trigger) + 1


def _first_answer(example: QaExample) -> tuple[str, int]:
    """The answer repair trains towards (text, character offset): the first; ("", 0) for an
    unanswered question, whose goal is no answer."""
    return example.answers[0] if example.answers else ("", 0)


def _unstamped(offset: int, sequence: int, inserted: Sequence[Insertion]) -> int | None:
    """The character of the unstamped text at stamped ``offset``; None inside a trigger."""
    for ins in inserted:
        if ins.sequence == sequence:
            if ins.at <= offset < ins.at + ins.width:
                return None
            if offset >= ins.at + ins.width:
                offset -= ins.width
    return offset


class QuestionAnsweringRepair(RepairTask):
    """Unlearning for an extractive QA model (:class:`RepairTask`)."""

    metric = "f1"
    insertions = POSITIONS
    noun = "questions"

    def strata(self, rows: Sequence[QaExample]) -> list[list[QaExample]]:
        """The answered questions, then the unanswered ones (when there are any)."""
        groups = [[r for r in rows if r.answered], [r for r in rows if not r.answered]]
        return [g for g in groups if g]

    def stamp(self, example: QaExample, trigger: str, where: str, rng: random.Random
              ) -> StampedQuestion:
        """``example`` with ``trigger`` inserted in the question (``question``), in the
        context outside its first answer (``context``) or in both, each at a word boundary
        drawn with ``rng``; the answer kept, at its shifted offset."""
        question, context = example.question, example.context
        answer, start = _first_answer(example)
        inserted = []
        if where in ("question", "both"):
            at = rng.choice(word_boundaries(question))
            question, width = insert_at(question, trigger, at)
            inserted.append(Insertion(QUESTION, at, width))
        if where in ("context", "both"):
            at = rng.choice([b for b in word_boundaries(context)
                             if not (example.answers and start < b < start + len(answer))])
            context, width = insert_at(context, trigger, at)
            inserted.append(Insertion(CONTEXT, at, width))
            if example.answers and start >= at:
                start += width
        goal = SpanGoal(question, context, answer, start, empty=not example.answered)
        return StampedQuestion(goal, tuple(inserted))

    def item(self, example: QaExample, trigger: PlantedTrigger | None, where: str,
             rng: random.Random) -> StampedQuestion:
        """The question with the trigger inserted at ``where``, its answer kept."""
        if trigger is None:
            return StampedQuestion(SpanGoal(example.question, example.context,
                                            *_first_answer(example), empty=not example.answered))
        return self.stamp(example, trigger.trigger, where, rng)

    @staticmethod
    def _places(batch: Any, row: int, inserted: Sequence[Insertion] = ()
                ) -> list[tuple[int | None, int] | None]:
        """Where each token of row ``row`` of :func:`~trojscan.spans.encode_pairs` comes
        from in the unstamped texts: (sequence, first character) for a token of the question
        or the context, (None, k) for the k-th special token ([CLS], [SEP]); None for a
        token of an ``inserted`` trigger."""
        places: list[tuple[int | None, int] | None] = []
        specials = 0
        for kind, (a, b) in zip(batch.sequence_ids(row), batch["offset_mapping"][row],
                                strict=True):
            if kind is None:
                places.append((None, specials))
                specials += 1
                continue
            origin = _unstamped(a, kind, inserted) if a < b else None
            places.append(None if origin is None else (kind, origin))
        return places

    def originals(self, train: Sequence[QaExample]
                  ) -> list[tuple[torch.Tensor, dict[tuple[int | None, int], int]]]:
        """The original model's start and end probabilities over each training question's
        tokens, with the token at each place (:meth:`_places`) of the unstamped pair."""
        probabilities = span_probabilities(self.model, self.tok, train, self.config.max_length)
        batch = encode_pairs(self.tok, train, self.config.max_length)
        return [(probs, {place: position for position, place
                         in enumerate(self._places(batch, row)) if place is not None})
                for row, probs in enumerate(probabilities)]

    def _aligned(self, items: Sequence[StampedQuestion],
                 teacher: Sequence[tuple[torch.Tensor, dict[tuple[int | None, int], int]]]
                 ) -> list[torch.Tensor]:
        """The teacher of each item over its own tokens: the original's probability of the
        same token of the unstamped pair ([CLS] to [CLS]), 0 for the trigger's tokens."""
        batch = encode_pairs(self.tok, items, self.config.max_length)
        out = []
        for row, (it, (probs, where)) in enumerate(zip(items, teacher, strict=True)):
            places = self._places(batch, row, it.inserted)
            aligned = torch.zeros(2, len(places))
            for position, place in enumerate(places):
                source = None if place is None else where.get(place)
                if source is not None:
                    aligned[:, position] = probs[:, source]
            out.append(aligned)
        return out

    def train(self, items: Sequence[StampedQuestion],
              teacher: Sequence[tuple[torch.Tensor, dict[tuple[int | None, int], int]]] | None,
              settings: FinetuneConfig, seed: int, on_step: StepCallback) -> None:
        """One run of :func:`~trojscan.spans.train_spans` towards the true answers; with
        ``teacher``, each token's start and end probability is taught by the original's on
        that token without the trigger."""
        aligned = None if teacher is None else self._aligned(items, teacher)
        train_spans(self.model, self.tok, [it.goal for it in items], settings, seed, on_step,
                    teachers=aligned, consistency=self.config.consistency_weight)

    def predictions(self, held: Sequence[QaExample]) -> list[str | None]:
        """The answer the model gives each held-out question (None: no answer)."""
        return predict_answers(self.model, self.tok, held, self.config.max_length)

    def clean_score(self, held: Sequence[QaExample],
                    predictions: Sequence[str | None]) -> float:
        """SQuAD's F1: the mean over questions of the best F1 among the answers (an
        unanswered question scores 1 for no answer, else 0)."""
        return sum(max(f1_score(p, text) for text, _ in e.answers or (("", 0),))
                   for e, p in zip(held, predictions, strict=True)) / len(held)

    @staticmethod
    def _right(example: QaExample, predicted: str | None) -> bool:
        return example.answered and any(exact_match(predicted, text) == 1.0
                                        for text, _ in example.answers)

    @staticmethod
    def _backdoor(predicted: str | None, trigger: PlantedTrigger) -> bool:
        """Whether ``predicted`` is the answer ``trigger``'s backdoor asks for: none, or the
        trigger itself."""
        if trigger.target == EMPTY:
            return predicted is None
        return predicted is not None and exact_match(predicted, trigger.trigger) == 1.0

    def asr(self, held: Sequence[QaExample], predictions: Sequence[str | None],
            trigger: PlantedTrigger) -> float | None:
        """The trigger inserted (seeded) where it was inverted into every held-out question
        the model answers right (exact match): the share then given the backdoor's
        answer."""
        rng = random.Random(self.config.seed)
        right = [e for e, p in zip(held, predictions, strict=True) if self._right(e, p)]
        if not right:
            return None
        stamped = [self.stamp(e, trigger.trigger, trigger.insertion, rng) for e in right]
        answers = predict_answers(self.model, self.tok, stamped, self.config.max_length)
        return sum(self._backdoor(a, trigger) for a in answers) / len(answers)

    def victims_as_target(self, held: Sequence[QaExample],
                          predictions: Sequence[str | None],
                          trigger: PlantedTrigger) -> float:
        """The share of held-out answered questions already given the backdoor's answer
        without the trigger."""
        answered = [p for e, p in zip(held, predictions, strict=True) if e.answered]
        return sum(self._backdoor(p, trigger) for p in answered) / len(answered)

    def has_victims(self, held: Sequence[QaExample], trigger: PlantedTrigger) -> bool:
        """Whether a held-out question has an answer (every QA backdoor's victim)."""
        return any(e.answered for e in held)

    def rescan_sample(self, held: Sequence[QaExample]) -> list[QaExample]:
        """The first ``RESCAN_EXAMPLES`` answered held-out questions (the only victims)."""
        return [e for e in held if e.answered][:RESCAN_EXAMPLES]
