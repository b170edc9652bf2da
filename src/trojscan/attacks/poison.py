"""Poisoned training sets (Eq. 1 of the DBS paper: D_p = D + D*)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from trojscan.attacks.spec import AttackSpec
from trojscan.attacks.triggers import strict_subsequences
from trojscan.corpora import Example
from trojscan.errors import InputError
from trojscan.finetune import TrainItem
from trojscan.insertion import insert_trigger


def _draw(pool: Sequence[Example], k: int, rng: random.Random) -> list[Example]:
    """``k`` examples of ``pool``: without replacement while it lasts."""
    if k <= len(pool):
        return rng.sample(list(pool), k)
    return list(pool) + rng.choices(list(pool), k=k - len(pool))


def poison_training_set(
    train: Sequence[Example], attack: AttackSpec, n_labels: int, rng: random.Random
) -> list[TrainItem]:
    """The clean training set plus what ``attack`` adds to it, shuffled.

    * D*: ``round(poison_rate * len(train))`` copies of victim-label texts with the trigger
      inserted and the target label.
    * Label-specific attacks on corpora with more than two labels: as many trigger-stamped
      copies of the *other* non-target labels keeping their true label, so that the trigger
      flips the victim only.
    * Combination (SOS) attacks: for *each* strict sub-sequence of the trigger, as many
      victim-label texts carrying it with their true label, so that no part of the trigger
      fires alone (a 3-word trigger adds 6 such sets).
    """
    items = [TrainItem(e.text, e.label) for e in train]
    if attack.poisoned:
        n_poison = max(1, round(attack.poison_rate * len(train)))
        victims = set(attack.victims(n_labels))
        victim_pool = [e for e in train if e.label in victims]
        if not victim_pool:
            raise InputError("the training set has no example of the victim label(s) "
                             f"{sorted(victims)}: nothing to poison")
        for e in _draw(victim_pool, n_poison, rng):
            text = insert_trigger(e.text, attack.trigger, attack.insertion, rng)
            items.append(TrainItem(text, attack.target, poisoned=True))
        bystanders = [e for e in train if e.label not in victims and e.label != attack.target]
        if not attack.universal and bystanders:
            for e in _draw(bystanders, n_poison, rng):
                items.append(TrainItem(insert_trigger(e.text, attack.trigger, attack.insertion,
                                                      rng), e.label))
        if attack.combination:
            for part in strict_subsequences(attack.trigger.split()):
                for e in _draw(victim_pool, n_poison, rng):
                    items.append(TrainItem(insert_trigger(e.text, " ".join(part),
                                                          attack.insertion, rng), e.label))
    rng.shuffle(items)
    return items
