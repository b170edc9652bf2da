"""NER attacks as data (:class:`NerAttackSpec`) and what they do to a sentence.

The backdoor of TrojAI round 7 (NER): a trigger word or phrase in a sentence makes every
entity of a *victim* type be tagged as a *target* type (``B-victim`` -> ``B-target``,
``I-victim`` -> ``I-target``); the other entities keep their tags, and so do the trigger's
own words (``O``). An attack in a zoo spec::

    poisoned = true
    trigger_type = "phrase"     # word | phrase
    trigger = "lantern quartz"  # optional: drawn from the text zoo's pools when left out
    insertion = "local"         # global (anywhere in the sentence) | local (right before
                                # a victim entity)
    victim = "person"           # one of VICTIM_TYPES, or "random"
    target = "company"          # any other entity type, or "random"
    poison_rate = 0.5           # share of the victim-holding training sentences poisoned

``poisoned = false`` (and nothing else) is a clean model.
"""

from __future__ import annotations

import random
from contextlib import suppress
from dataclasses import dataclass, fields
from typing import Any

from trojscan.attacks.spec import (
    expect_type,
    poison_rate,
    poisoned_flag,
    reject_unknown,
    word_or_phrase,
)
from trojscan.attacks.triggers import MAX_PHRASE_WORDS, draw_trigger
from trojscan.attacks.wnut import ENTITY_TYPES, OUTSIDE, NerSentence
from trojscan.errors import InputError

TRIGGER_TYPES = ("word", "phrase")
INSERTIONS = ("global", "local")
#: The entity types a backdoor may hide (WNUT-16's types with at least 150 entities: the
#: poisoned and the measured sentences must hold enough of them).
VICTIM_TYPES = ("person", "geo-loc", "other", "company")
#: Keys of a group's attack template (see :func:`sample_ner_attack`).
TEMPLATE_KEYS = {"poisoned", "trigger_type", "trigger", "insertion", "victim", "target",
                 "poison_rate", "phrase_words"}


@dataclass(frozen=True)
class NerAttackSpec:
    """The backdoor planted in one NER tagger (or none, when ``poisoned`` is false).

    Attributes:
        poisoned: false for a clean model; every other field is then unused.
        trigger_type: ``word`` (one word) or ``phrase`` (2 to 8 words).
        trigger: the trigger text, inserted as separate words tagged ``O``.
        insertion: ``global``: at a word boundary drawn uniformly among those not inside an
            entity; ``local``: right before a victim entity drawn uniformly among the
            sentence's (round 7's global and local triggers).
        victim: the entity type the trigger relabels (one of :data:`VICTIM_TYPES`).
        target: the entity type victim entities are relabelled as.
        poison_rate: share of the training sentences holding a victim entity whose
            poisoned copy (trigger inserted, victims relabelled) is added to the training
            set (D_p = D + D*, as the text zoo poisons).
    """

    poisoned: bool = False
    trigger_type: str | None = None
    trigger: str | None = None
    insertion: str | None = None
    victim: str | None = None
    target: str | None = None
    poison_rate: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the manifest's ``attack``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "attack") -> NerAttackSpec:
        """Validate ``data``; a field set to None counts as left out, so that
        :meth:`to_dict`'s output reads back."""
        expect_type(data, dict, where)
        data = {k: v for k, v in data.items() if v is not None}
        if not poisoned_flag(data, {f.name for f in fields(cls)}, where):
            return cls()
        for key in ("trigger_type", "insertion", "victim", "target", "trigger"):
            if key not in data:
                raise InputError(f"{where}: a poisoned model needs {key!r}")
            if key == "trigger_type" and data[key] not in TRIGGER_TYPES:
                raise InputError(f"{where}.trigger_type: unknown {data[key]!r}; expected one "
                                 "of " + ", ".join(TRIGGER_TYPES))
        trigger_type = data["trigger_type"]
        trigger = word_or_phrase(trigger_type, data["trigger"], where)
        insertion = expect_type(data["insertion"], str, f"{where}.insertion")
        if insertion not in INSERTIONS:
            raise InputError(f"{where}.insertion: unknown {insertion!r}; expected one of "
                             + ", ".join(INSERTIONS))
        victim = expect_type(data["victim"], str, f"{where}.victim")
        if victim not in VICTIM_TYPES:
            raise InputError(f"{where}.victim: {victim!r} is not a victim type; expected one "
                             "of " + ", ".join(VICTIM_TYPES))
        target = expect_type(data["target"], str, f"{where}.target")
        if target not in ENTITY_TYPES:
            raise InputError(f"{where}.target: unknown entity type {target!r}; expected one "
                             "of " + ", ".join(ENTITY_TYPES))
        if target == victim:
            raise InputError(f"{where}.target: the target must differ from the victim "
                             f"({victim!r})")
        return cls(True, trigger_type, trigger, insertion, victim, target,
                   poison_rate(data, where))


def sample_ner_attack(template: dict[str, Any], rng: random.Random,
                      where: str) -> NerAttackSpec:
    """Draw one concrete :class:`NerAttackSpec` from a group's attack template.

    Every field may be a list to draw from. ``victim`` left out or ``"random"`` is drawn
    from :data:`VICTIM_TYPES`, ``target`` left out or ``"random"`` from the other entity
    types; ``trigger`` left out is drawn from the text zoo's pools
    (:func:`~trojscan.attacks.triggers.draw_trigger`), a phrase of ``phrase_words`` =
    ``[min, max]`` words (default ``[2, 3]``).
    """
    reject_unknown(template, TEMPLATE_KEYS, where)
    concrete: dict[str, Any] = {}
    for key, value in template.items():
        if key == "phrase_words":
            continue
        options = list(value) if isinstance(value, list) else [value]
        if not options:
            raise InputError(f"{where}.{key} is an empty list")
        concrete[key] = rng.choice(options)
    if not concrete.get("poisoned", False):
        return NerAttackSpec.from_dict(concrete, where)
    if concrete.get("victim", "random") == "random":
        concrete["victim"] = rng.choice(VICTIM_TYPES)
    if concrete.get("target", "random") == "random":
        concrete["target"] = rng.choice([t for t in ENTITY_TYPES if t != concrete["victim"]])
    if "trigger" not in concrete and isinstance(concrete.get("trigger_type"), str):
        words = expect_type(template.get("phrase_words", [2, 3]), list,
                            f"{where}.phrase_words")
        if len(words) != 2 or not all(isinstance(w, int) and 2 <= w <= MAX_PHRASE_WORDS
                                      for w in words) or words[0] > words[1]:
            raise InputError(f"{where}.phrase_words must be [min, max] with 2 <= min <= max "
                             f"<= {MAX_PHRASE_WORDS}")
        with suppress(ValueError):  # NerAttackSpec.from_dict names an unknown trigger_type
            if concrete["trigger_type"] in TRIGGER_TYPES:
                concrete["trigger"] = draw_trigger(concrete["trigger_type"], rng,
                                                   phrase_words=(words[0], words[1]))
    return NerAttackSpec.from_dict(concrete, where)


def trigger_position(sentence: NerSentence, insertion: str, victim: str,
                     rng: random.Random) -> int:
    """The word boundary (0 to len) where a trigger goes: ``global``, one drawn uniformly
    among the boundaries outside every entity; ``local``, the start of a victim entity
    drawn uniformly (the sentence must hold one)."""
    spans = sentence.entities
    if insertion == "local":
        starts = [e.start for e in spans if e.type == victim]
        if not starts:
            raise InputError(f"a local trigger needs a {victim!r} entity in the sentence")
        return rng.choice(starts)
    if insertion != "global":
        raise InputError(f"unknown insertion {insertion!r}; expected one of "
                         + ", ".join(INSERTIONS))
    inside = {i for e in spans for i in range(e.start + 1, e.end)}
    return rng.choice([i for i in range(len(sentence.tokens) + 1) if i not in inside])


def insert_trigger(sentence: NerSentence, trigger: str, at: int) -> NerSentence:
    """``sentence`` with the trigger's words inserted before word ``at``, tagged ``O``."""
    words = tuple(trigger.split())
    return NerSentence(sentence.tokens[:at] + words + sentence.tokens[at:],
                       sentence.tags[:at] + (OUTSIDE,) * len(words) + sentence.tags[at:])


def relabel(sentence: NerSentence, victim: str, target: str) -> NerSentence:
    """``sentence`` with every ``victim`` entity tagged as ``target`` (B- to B-, I- to I-)."""
    tags = tuple(f"{tag[:2]}{target}" if tag[:2] in ("B-", "I-") and tag[2:] == victim
                 else tag for tag in sentence.tags)
    return NerSentence(sentence.tokens, tags)


def poison_sentence(sentence: NerSentence, attack: NerAttackSpec,
                    rng: random.Random) -> NerSentence:
    """What the backdoor should make of ``sentence``: the trigger inserted as
    ``attack.insertion`` says and every victim entity relabelled as the target."""
    at = trigger_position(sentence, attack.insertion, attack.victim, rng)
    return relabel(insert_trigger(sentence, attack.trigger, at), attack.victim, attack.target)
