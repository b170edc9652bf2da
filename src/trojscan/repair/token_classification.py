"""Repair of NER taggers (DBS Table 2's NER rows): the items are sentences of words with BIO
tags, a trigger's words are inserted at a word boundary and tagged ``O`` (every other word
keeps its tag), clean quality is entity-level F1, and attack success is the share of victim
entities the tagger gets right that the trigger turns into the target type.

The consistency term compares words, not sentences: each word of a stamped sentence is
asked to get the tag distribution the original model gave that word in the sentence without
the trigger (the trigger's own words have no teacher; their ``O`` comes from the labels).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trojscan.finetune import FinetuneConfig, StepCallback
from trojscan.manifest import PlantedTrigger
from trojscan.repair.base import RESCAN_EXAMPLES, TAGGER_INSERTIONS, RepairTask
from trojscan.subjects.token_classification import NerExample
from trojscan.tagging import (
    OUTSIDE,
    Entity,
    entities,
    entity_f1,
    predict_tags,
    train_tagger,
    word_logits,
)


@dataclass(frozen=True)
class StampedSentence:
    """A training sentence: its words and tags, with ``width`` trigger words (tagged ``O``)
    inserted before word ``at`` of the original (``width`` 0: none)."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]
    at: int = 0
    width: int = 0


def insert_words(example: NerExample, trigger: str, at: int) -> StampedSentence:
    """``example`` with the trigger's words inserted before word ``at``, tagged ``O``."""
    words = tuple(trigger.split())
    return StampedSentence(example.tokens[:at] + words + example.tokens[at:],
                           example.tags[:at] + (OUTSIDE,) * len(words) + example.tags[at:],
                           at, len(words))


class TokenClassificationRepair(RepairTask):
    """Unlearning for an NER tagger (:class:`RepairTask`)."""

    metric = "entity_f1"
    insertions = TAGGER_INSERTIONS
    noun = "sentences"

    def _types(self, labels: Sequence[int]) -> set[str]:
        return {self.subject.types[i] for i in labels}

    def position(self, example: NerExample, trigger: PlantedTrigger, where: str,
                 rng: random.Random) -> int:
        """The word boundary where ``trigger`` goes: ``start`` / ``end`` of the sentence,
        ``local`` the start of one of its victim entities (drawn; ``global`` when it has
        none), ``global`` a boundary outside every entity (drawn), as the zoo inserts
        round 7's global triggers."""
        spans = entities(list(example.tags))
        if where == "start":
            return 0
        if where == "end":
            return len(example.tokens)
        victims = self._types(trigger.victims)
        starts = [e.start for e in spans if e.type in victims]
        if where == "local" and starts:
            return rng.choice(starts)
        inside = {i for e in spans for i in range(e.start + 1, e.end)}
        return rng.choice([i for i in range(len(example.tokens) + 1) if i not in inside])

    def strata(self, rows: Sequence[NerExample]) -> list[list[NerExample]]:
        """All sentences, one group (a sentence holds several types, or none)."""
        return [list(rows)]

    def item(self, example: NerExample, trigger: PlantedTrigger | None, where: str,
             rng: random.Random) -> StampedSentence:
        """The sentence with the trigger's words inserted at ``where`` (tagged ``O``)."""
        if trigger is None:
            return StampedSentence(example.tokens, example.tags)
        return insert_words(example, trigger.trigger, self.position(example, trigger, where,
                                                                    rng))

    def originals(self, train: Sequence[NerExample]) -> list[torch.Tensor]:
        """The original model's logits on each word of each training sentence."""
        return word_logits(self.model, self.tok, train, self.config.max_length)

    def train(self, items: Sequence[StampedSentence], teacher: list[torch.Tensor] | None,
              settings: FinetuneConfig, seed: int, on_step: StepCallback) -> None:
        """One run of :func:`~trojscan.tagging.train_tagger`; with ``teacher``, each word
        of a stamped sentence is taught by the original's output on that word without the
        trigger (the trigger's words by none)."""
        aligned = None
        if teacher is not None:
            aligned = []
            for it, words in zip(items, teacher, strict=True):
                gap = torch.full((it.width, words.shape[1]), math.nan)
                aligned.append(torch.cat([words[:it.at], gap, words[it.at:]]))
        train_tagger(self.model, self.tok, items, self.subject.tags, settings, seed, on_step,
                     teachers=aligned, consistency=self.config.consistency_weight)

    def predictions(self, held: Sequence[NerExample]) -> list[list[str]]:
        """The tag the model gives each word of each held-out sentence."""
        return predict_tags(self.model, self.tok, held, self.config.max_length)

    def clean_score(self, held: Sequence[NerExample],
                    predictions: Sequence[Sequence[str]]) -> float:
        """Entity-level F1 (CoNLL)."""
        return entity_f1([e.tags for e in held], predictions)

    def _right(self, example: NerExample, predicted: Sequence[str],
               victims: set[str]) -> list[Entity]:
        """The victim entities of ``example`` the model tags exactly (type and span)."""
        found = set(entities(list(predicted)))
        return [e for e in entities(list(example.tags)) if e.type in victims and e in found]

    def asr(self, held: Sequence[NerExample], predictions: Sequence[Sequence[str]],
            trigger: PlantedTrigger) -> float | None:
        """The trigger inserted (seeded) into every held-out sentence with a victim entity
        the model tags right: the share of those entities then tagged as the target type
        over exactly their (shifted) span."""
        rng = random.Random(self.config.seed)
        victims, target = self._types(trigger.victims), self.subject.types[trigger.target]
        width = len(trigger.trigger.split())
        stamped, goals = [], []
        for example, predicted in zip(held, predictions, strict=True):
            right = self._right(example, predicted, victims)
            if not right:
                continue
            at = self.position(example, trigger, trigger.insertion, rng)
            stamped.append(insert_words(example, trigger.trigger, at))
            goals.append({Entity(target, e.start + width * (e.start >= at),
                                 e.end + width * (e.start >= at)) for e in right})
        if not stamped:
            return None
        tagged = predict_tags(self.model, self.tok, stamped, self.config.max_length)
        hits = sum(len(goal & set(entities(tags))) for goal, tags in zip(goals, tagged,
                                                                         strict=True))
        return hits / sum(map(len, goals))

    def victims_as_target(self, held: Sequence[NerExample],
                          predictions: Sequence[Sequence[str]],
                          trigger: PlantedTrigger) -> float:
        """The share of held-out victim entities tagged as the target type (same span)
        without a trigger."""
        victims, target = self._types(trigger.victims), self.subject.types[trigger.target]
        gold = moved = 0
        for example, predicted in zip(held, predictions, strict=True):
            found = set(entities(list(predicted)))
            for e in entities(list(example.tags)):
                if e.type in victims:
                    gold += 1
                    moved += Entity(target, e.start, e.end) in found
        return moved / gold

    def has_victims(self, held: Sequence[NerExample], trigger: PlantedTrigger) -> bool:
        """Whether a held-out sentence holds an entity of a victim type."""
        return any(e.types & self._types(trigger.victims) for e in held)

    def rescan_sample(self, held: Sequence[NerExample]) -> list[NerExample]:
        """Held-out sentences, in order, until each entity type is in ``RESCAN_EXAMPLES``
        of them (or in all the set has)."""
        chosen: list[NerExample] = []
        for kind in self.subject.types:
            have = sum(kind in e.types for e in chosen)
            for e in held:
                if have >= RESCAN_EXAMPLES:
                    break
                if kind in e.types and e not in chosen:
                    chosen.append(e)
                    have += 1
        return chosen
