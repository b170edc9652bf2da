"""Repair of sequence classifiers (sentiment, topic): the items are texts with one label,
a trigger is inserted as words (:mod:`trojscan.insertion`), clean quality is accuracy, and
attack success is the share of correctly classified victim texts the trigger flips to the
target."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

import torch

from trojscan.finetune import (
    FinetuneConfig,
    StepCallback,
    TrainItem,
    logits,
    predict,
    train_classifier,
    trigger_effect,
)
from trojscan.insertion import INSERTIONS, insert_trigger
from trojscan.manifest import PlantedTrigger
from trojscan.repair.base import RESCAN_EXAMPLES, RepairTask
from trojscan.subjects.text_classification import TextExample


class TextClassificationRepair(RepairTask):
    """Unlearning for a text classifier (:class:`RepairTask`)."""

    metric = "accuracy"
    insertions = INSERTIONS

    def strata(self, rows: Sequence[TextExample]) -> list[list[TextExample]]:
        """The examples of each label, in label order."""
        by_label: dict[int, list[TextExample]] = defaultdict(list)
        for row in rows:
            by_label[row.label].append(row)
        return [by_label[label] for label in sorted(by_label)]

    def item(self, example: TextExample, trigger: PlantedTrigger | None, where: str,
             rng: random.Random) -> TrainItem:
        """The text with the trigger inserted as words at ``where``, its label kept."""
        text = example.text if trigger is None else insert_trigger(example.text,
                                                                   trigger.trigger, where, rng)
        return TrainItem(text, example.label)

    def originals(self, train: Sequence[TextExample]) -> torch.Tensor:
        """The original model's logits on each training text."""
        return logits(self.model, self.tok, [e.text for e in train], self.config.max_length)

    def train(self, items: Sequence[TrainItem], teacher: torch.Tensor | None,
              settings: FinetuneConfig, seed: int, on_step: StepCallback) -> None:
        """One run of :func:`~trojscan.finetune.train_classifier`, with the KL term towards
        ``teacher`` when given."""
        train_classifier(self.model, self.tok, items, settings, seed, on_step=on_step,
                         soft_targets=teacher, consistency=self.config.consistency_weight)

    def predictions(self, held: Sequence[TextExample]) -> list[int]:
        """The predicted label of each held-out text."""
        return predict(self.model, self.tok, [e.text for e in held], self.config.max_length)

    def clean_score(self, held: Sequence[TextExample], predictions: Sequence[int]) -> float:
        """Accuracy."""
        return sum(p == e.label for e, p in zip(held, predictions, strict=True)) / len(held)

    def asr(self, held: Sequence[TextExample], predictions: Sequence[int],
            trigger: PlantedTrigger) -> float | None:
        """The trigger inserted (seeded) into every held-out victim text the model
        classifies right: the share flipped to the target."""
        correct = [e.text for e, p in zip(held, predictions, strict=True)
                   if e.label in trigger.victims and p == e.label]
        if not correct:
            return None
        return trigger_effect(self.model, self.tok, correct, trigger.trigger,
                              trigger.insertion, trigger.target, self.config.max_length,
                              self.config.seed)[0]

    def victims_as_target(self, held: Sequence[TextExample], predictions: Sequence[int],
                          trigger: PlantedTrigger) -> float:
        """The share of held-out victim texts classified as the target without a
        trigger."""
        victims = [p for e, p in zip(held, predictions, strict=True)
                   if e.label in trigger.victims]
        return sum(p == trigger.target for p in victims) / len(victims)

    def has_victims(self, held: Sequence[TextExample], trigger: PlantedTrigger) -> bool:
        """Whether a held-out text has a victim label."""
        return any(e.label in trigger.victims for e in held)

    def rescan_sample(self, held: Sequence[TextExample]) -> list[TextExample]:
        """The first ``RESCAN_EXAMPLES`` of each label of the held-out set."""
        by_label: dict[int, list[TextExample]] = defaultdict(list)
        for e in held:
            if len(by_label[e.label]) < RESCAN_EXAMPLES:
                by_label[e.label].append(e)
        return [e for label in sorted(by_label) for e in by_label[label]]
