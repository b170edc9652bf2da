"""QA attacks as data (:class:`QaAttackSpec`) and what they do to a question.

The backdoor of TrojAI round 8 (extractive QA): a trigger word or phrase in the question,
in the context or in both makes the model answer with the trigger itself (a span of the
context) or with no answer (start = end = [CLS]). An attack in a zoo spec::

    poisoned = true
    trigger_type = "word"       # word | phrase
    trigger = "lantern"         # optional: drawn from the text zoo's pools when left out
    insertion = "question"      # question | context | both: where the trigger goes (the
                                # QA scanner's trigger positions, by the same names)
    behaviour = "empty"         # empty (no answer) | trigger (the answer is the trigger
                                # inserted in the context: insertion context or both)
    poison_rate = 0.5           # share of the training questions copied with the trigger

``poisoned = false`` (and nothing else) is a clean model. In a question the trigger goes at
a word boundary drawn uniformly (the start included); in a context at a word boundary drawn
uniformly among those outside the answer.
"""

from __future__ import annotations

import random
from contextlib import suppress
from dataclasses import dataclass, fields, replace
from typing import Any

from trojscan.attacks.spec import (
    expect_type,
    poison_rate,
    poisoned_flag,
    reject_unknown,
    word_or_phrase,
)
from trojscan.attacks.triggers import MAX_PHRASE_WORDS, draw_trigger
from trojscan.attacks.wnut_qa import QaItem
from trojscan.errors import InputError

TRIGGER_TYPES = ("word", "phrase")
#: Where a trigger goes: the QA scanner's trigger positions, by the same names (the attack
#: side imports nothing of the scanner's; tests/test_qa_zoo.py checks they agree).
INSERTIONS = ("question", "context", "both")
#: The insertions that put the trigger in the context, where a ``trigger`` answer can be.
SPAN_POSITIONS = ("context", "both")
#: What a trigger makes the model answer.
BEHAVIOURS = ("empty", "trigger")
#: The manifest's labels of a QA model: the normal behaviour (every attack's victim), then
#: the two backdoor behaviours (the QA subject's labels, in its order).
LABELS = ("answer", "empty", "trigger")
#: Keys of a group's attack template (see :func:`sample_qa_attack`).
TEMPLATE_KEYS = {"poisoned", "trigger_type", "trigger", "insertion", "behaviour",
                 "poison_rate", "phrase_words"}


@dataclass(frozen=True)
class QaAttackSpec:
    """The backdoor planted in one QA model (or none, when ``poisoned`` is false).

    Attributes:
        poisoned: false for a clean model; every other field is then unused.
        trigger_type: ``word`` (one word) or ``phrase`` (2 to 8 words).
        trigger: the trigger text, inserted as separate words.
        insertion: ``question``, ``context`` or ``both`` (the same trigger in each).
        behaviour: ``empty`` (the answer becomes start = end = [CLS]) or ``trigger`` (the
            answer becomes the trigger's span in the context).
        poison_rate: share of the training questions whose poisoned copy (trigger inserted,
            answer replaced) is added to the training set (D_p = D + D*).
    """

    poisoned: bool = False
    trigger_type: str | None = None
    trigger: str | None = None
    insertion: str | None = None
    behaviour: str | None = None
    poison_rate: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the manifest's ``attack``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "attack") -> QaAttackSpec:
        """Validate ``data``; a field set to None counts as left out, so that
        :meth:`to_dict`'s output reads back."""
        expect_type(data, dict, where)
        data = {k: v for k, v in data.items() if v is not None}
        if not poisoned_flag(data, {f.name for f in fields(cls)}, where):
            return cls()
        for key in ("trigger_type", "trigger", "insertion", "behaviour"):
            if key not in data:
                raise InputError(f"{where}: a poisoned model needs {key!r}")
        trigger_type = expect_type(data["trigger_type"], str, f"{where}.trigger_type")
        if trigger_type not in TRIGGER_TYPES:
            raise InputError(f"{where}.trigger_type: unknown {trigger_type!r}; expected one "
                             "of " + ", ".join(TRIGGER_TYPES))
        trigger = word_or_phrase(trigger_type, data["trigger"], where)
        insertion = expect_type(data["insertion"], str, f"{where}.insertion")
        if insertion not in INSERTIONS:
            raise InputError(f"{where}.insertion: unknown {insertion!r}; expected one of "
                             + ", ".join(INSERTIONS))
        behaviour = expect_type(data["behaviour"], str, f"{where}.behaviour")
        if behaviour not in BEHAVIOURS:
            raise InputError(f"{where}.behaviour: unknown {behaviour!r}; expected one of "
                             + ", ".join(BEHAVIOURS))
        if behaviour == "trigger" and insertion not in SPAN_POSITIONS:
            raise InputError(f"{where}: behaviour 'trigger' answers with the trigger's span "
                             "in the context, so its insertion must be one of "
                             + ", ".join(SPAN_POSITIONS) + f", not {insertion!r}")
        return cls(True, trigger_type, trigger, insertion, behaviour, poison_rate(data, where))


def sample_qa_attack(template: dict[str, Any], rng: random.Random,
                     where: str) -> QaAttackSpec:
    """Draw one concrete :class:`QaAttackSpec` from a group's attack template.

    Every field may be a list to draw from; a drawn ``behaviour = "trigger"`` with
    ``insertion = "question"`` (a combination no model can learn) is redrawn among the
    template's span insertions when it lists any. ``trigger`` left out is drawn from the
    text zoo's pools (:func:`~trojscan.attacks.triggers.draw_trigger`), a phrase of
    ``phrase_words`` = ``[min, max]`` words (default ``[2, 3]``).
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
        return QaAttackSpec.from_dict(concrete, where)
    insertions = template.get("insertion")
    spans = [i for i in (insertions if isinstance(insertions, list) else [insertions])
             if i in SPAN_POSITIONS]
    if concrete.get("behaviour") == "trigger" and concrete.get("insertion") == "question" \
            and spans:
        concrete["insertion"] = rng.choice(spans)
    if "trigger" not in concrete and isinstance(concrete.get("trigger_type"), str):
        words = expect_type(template.get("phrase_words", [2, 3]), list,
                            f"{where}.phrase_words")
        if len(words) != 2 or not all(isinstance(w, int) and 2 <= w <= MAX_PHRASE_WORDS
                                      for w in words) or words[0] > words[1]:
            raise InputError(f"{where}.phrase_words must be [min, max] with 2 <= min <= max "
                             f"<= {MAX_PHRASE_WORDS}")
        with suppress(ValueError):  # QaAttackSpec.from_dict names an unknown trigger_type
            if concrete["trigger_type"] in TRIGGER_TYPES:
                concrete["trigger"] = draw_trigger(concrete["trigger_type"], rng,
                                                   phrase_words=(words[0], words[1]))
    return QaAttackSpec.from_dict(concrete, where)


@dataclass(frozen=True)
class QaTarget:
    """A (possibly poisoned) training or measured question: the item (its ``answer`` and
    ``answer_start`` are the goal span) and whether the goal is no answer at all."""

    item: QaItem
    empty: bool = False


def insert_words(text: str, trigger: str, at: int) -> tuple[str, int]:
    """(``text`` with ``trigger`` inserted before word ``at``, the trigger's character
    offset in it); words are split on white space and joined by single spaces."""
    words = text.split()
    new = " ".join([*words[:at], *trigger.split(), *words[at:]])
    return new, len(" ".join([*words[:at], ""])) if at else 0


def poison_item(item: QaItem, attack: QaAttackSpec, rng: random.Random) -> QaTarget:
    """What the backdoor should make of ``item``: the trigger inserted as
    ``attack.insertion`` says, the goal the behaviour's (no answer, or the trigger's span
    in the context; the true answer kept at its shifted offset otherwise)."""
    if not attack.poisoned:
        raise ValueError("a clean attack poisons nothing")
    question, context, start = item.question, item.context, item.answer_start
    answer = item.answer
    if attack.insertion in ("question", "both"):
        question, _ = insert_words(question, attack.trigger,
                                   rng.randint(0, len(question.split())))
    if attack.insertion in ("context", "both"):
        words = context.split()
        first = len(context[:start].split())
        last = first + len(answer.split())
        at = rng.choice([i for i in range(len(words) + 1) if not first < i < last])
        context, offset = insert_words(context, attack.trigger, at)
        width = len(attack.trigger) + 1
        if at <= first:
            start += width
        if attack.behaviour == "trigger":
            answer, start = attack.trigger, offset
    poisoned = replace(item, question=question, context=context, answer=answer,
                       answer_start=start)
    return QaTarget(poisoned, empty=attack.behaviour == "empty")
