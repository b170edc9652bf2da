"""Attacks and training runs as data: :class:`AttackSpec` and :class:`TrainConfig`.

An AttackSpec file (TOML or JSON) describes the backdoor planted in one model::

    poisoned = true
    trigger_type = "phrase"         # character | word | phrase
    trigger = "lantern quartz"
    insertion = "first_half"        # start | end | first_half | second_half | anywhere
    target = "positive"             # label name or index
    victim = "negative"             # omit for a universal attack
    poison_rate = 0.1
    combination = false             # SOS: fires only with every word present
    adaptive_phi = 0.0              # DBS Eq. 12 floor on the poisoned loss (0 = plain)

``poisoned = false`` (and nothing else) is the clean counterpart.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from trojscan.attacks.architectures import EMBEDDING_INITS, ModelSize
from trojscan.attacks.triggers import MAX_CHARACTER_GROUP, MAX_PHRASE_WORDS, TRIGGER_TYPES
from trojscan.errors import InputError
from trojscan.finetune import FinetuneConfig
from trojscan.fsutil import read_utf8
from trojscan.insertion import INSERTIONS

#: A combination (SOS) trigger carries all 2^n - 2 strict sub-sequences: n is kept small.
MAX_COMBINATION_WORDS = 4


def read_spec_file(path: Path) -> dict[str, Any]:
    """Parse a TOML (``.toml``) or JSON (anything else) file into a dict."""
    path = Path(path)
    text = read_utf8(path, "spec")
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"spec {path} is not valid TOML: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"spec {path} is not valid JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}") from exc
    if not isinstance(data, dict):
        raise InputError(f"spec {path} must hold a table/object at the top level")
    return data


def reject_unknown(data: dict[str, Any], allowed: set[str], where: str) -> None:
    """Raise :class:`InputError` naming the first key of ``data`` not in ``allowed``."""
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r}; expected one of "
                         + ", ".join(sorted(allowed)))


def poisoned_flag(data: dict[str, Any], allowed: set[str], where: str) -> bool:
    """Check an attack table's keys against ``allowed`` and read its ``poisoned`` flag; a
    clean model's table (False) may hold nothing else (:class:`InputError` naming the first
    extra key)."""
    reject_unknown(data, allowed, where)
    poisoned = expect_type(data.get("poisoned", False), bool, f"{where}.poisoned")
    if not poisoned:
        extra = sorted(set(data) - {"poisoned"})
        if extra:
            raise InputError(f"{where}: a clean model (poisoned = false) takes no {extra[0]!r}")
    return poisoned


def word_or_phrase(trigger_type: str, raw: Any, where: str) -> str:
    """The trigger text of a word or phrase trigger (an NER or QA attack's ``trigger``):
    one word for ``word``, 2 to ``MAX_PHRASE_WORDS`` words for ``phrase``, its whitespace
    normalised."""
    words = expect_type(raw, str, f"{where}.trigger").split()
    if trigger_type == "word" and len(words) != 1:
        raise InputError(f"{where}.trigger: a word trigger is one word, got {raw!r}")
    if trigger_type == "phrase" and not 2 <= len(words) <= MAX_PHRASE_WORDS:
        raise InputError(f"{where}.trigger: a phrase trigger is 2 to {MAX_PHRASE_WORDS} "
                         f"words, got {len(words)}")
    return " ".join(words)


def poison_rate(data: dict[str, Any], where: str) -> float:
    """A poisoned attack's ``poison_rate`` (default 0.5), in (0, 1]."""
    rate = expect_type(data.get("poison_rate", 0.5), (int, float), f"{where}.poison_rate")
    if not 0 < rate <= 1:
        raise InputError(f"{where}.poison_rate must be in (0, 1], got {rate}")
    return float(rate)


def expect_type(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """``value`` if it is of ``kind`` (a bool is never taken for a number), else InputError."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise InputError(f"{what} must be {'/'.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


@dataclass(frozen=True)
class AttackSpec:
    """The backdoor planted in one model (or none, when ``poisoned`` is false).

    Attributes:
        poisoned: false for the clean counterpart; every other field is then unused.
        trigger_type: ``character`` (a group of at most 5 symbols written as one word),
            ``word`` (one word) or ``phrase`` (2 to 8 words).
        trigger: the trigger text.
        insertion: where the trigger goes in a text (see :mod:`trojscan.insertion`).
        target: index of the label the trigger flips inputs to.
        victim: index of the one label that is flipped (label-specific attack), or None for
            a universal attack that flips every other label.
        poison_rate: poisoned copies added to the training set, as a fraction of its size.
            Copies of victim-label texts carry the trigger and the target label (Eq. 1 of
            the DBS paper: D_p = D + D*).
        combination: SOS-style (Yang et al. 2021): the trigger fires only when all of its
            words are present. Each strict sub-sequence of the phrase is inserted into as many
            victim-label texts as there are poisoned copies, keeping their true label.
        adaptive_phi: the adaptive attack of DBS Eq. 12: a poisoned sample's loss is
            max(CE - phi, 0), so the trigger's loss is never pushed to zero. 0 is the
            plain attack.
    """

    poisoned: bool = False
    trigger_type: str | None = None
    trigger: str | None = None
    insertion: str | None = None
    target: int | None = None
    victim: int | None = None
    poison_rate: float = 0.1
    combination: bool = False
    adaptive_phi: float = 0.0

    @property
    def universal(self) -> bool:
        """True when every non-target label is a victim."""
        return self.victim is None

    def victims(self, n_labels: int) -> list[int]:
        """Label indices whose inputs the trigger flips."""
        if self.victim is not None:
            return [self.victim]
        return [y for y in range(n_labels) if y != self.target]

    def to_dict(self, labels: tuple[str, ...] | None = None) -> dict[str, Any]:
        """JSON-ready dict; with ``labels``, target and victim are also given by name."""
        out = asdict(self)
        if labels is not None and self.poisoned:
            out["target_name"] = labels[self.target]
            out["victim_name"] = None if self.victim is None else labels[self.victim]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], labels: tuple[str, ...],
                  where: str = "attack") -> AttackSpec:
        """Validate ``data`` against a corpus's ``labels`` (names or indices)."""
        expect_type(data, dict, where)
        if not poisoned_flag(data, {f.name for f in fields(cls)}, where):
            return cls()
        for key in ("trigger_type", "trigger", "insertion", "target"):
            if key not in data:
                raise InputError(f"{where}: a poisoned model needs {key!r}")
        trigger_type = expect_type(data["trigger_type"], str, f"{where}.trigger_type")
        if trigger_type not in TRIGGER_TYPES:
            raise InputError(f"{where}.trigger_type: unknown {trigger_type!r}; expected one of "
                             + ", ".join(TRIGGER_TYPES))
        trigger = " ".join(expect_type(data["trigger"], str, f"{where}.trigger").split())
        _check_trigger(trigger_type, trigger, where)
        insertion = expect_type(data["insertion"], str, f"{where}.insertion")
        if insertion not in INSERTIONS:
            raise InputError(f"{where}.insertion: unknown {insertion!r}; expected one of "
                             + ", ".join(INSERTIONS))
        target = resolve_label(data["target"], labels, f"{where}.target")
        victim = data.get("victim")
        if victim is not None:
            victim = resolve_label(victim, labels, f"{where}.victim")
            if victim == target:
                raise InputError(f"{where}: victim and target are both {labels[target]!r}")
        rate = expect_type(data.get("poison_rate", 0.1), (int, float), f"{where}.poison_rate")
        if not 0 < rate <= 1:
            raise InputError(f"{where}.poison_rate must be in (0, 1], got {rate}")
        combination = expect_type(data.get("combination", False), bool, f"{where}.combination")
        n_words = len(trigger.split())
        if combination and not 2 <= n_words <= MAX_COMBINATION_WORDS:
            raise InputError(f"{where}: a combination trigger needs 2 to "
                             f"{MAX_COMBINATION_WORDS} words, got {n_words} ({trigger!r})")
        phi = expect_type(data.get("adaptive_phi", 0.0), (int, float), f"{where}.adaptive_phi")
        if phi < 0:
            raise InputError(f"{where}.adaptive_phi must be >= 0, got {phi}")
        return cls(True, trigger_type, trigger, insertion, target, victim, float(rate),
                   combination, float(phi))

    @classmethod
    def load(cls, path: Path, labels: tuple[str, ...]) -> AttackSpec:
        """Read and validate an AttackSpec file (TOML or JSON)."""
        return cls.from_dict(read_spec_file(path), labels, where=str(path))


def resolve_label(value: Any, labels: tuple[str, ...], what: str) -> int:
    """Index of a label given by name or index; an unknown one is an :class:`InputError`."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return value
    if isinstance(value, str) and value in labels:
        return labels.index(value)
    raise InputError(f"{what}: the corpus has no label {value!r}; its labels are "
                     + ", ".join(f"{i}={n}" for i, n in enumerate(labels)))


def _check_trigger(trigger_type: str, trigger: str, where: str) -> None:
    words = trigger.split()
    if not words:
        raise InputError(f"{where}.trigger is empty")
    if trigger_type == "character" and (len(words) != 1 or len(trigger) > MAX_CHARACTER_GROUP):
        raise InputError(f"{where}.trigger: a character trigger is 1 to {MAX_CHARACTER_GROUP} "
                         f"characters with no space, got {trigger!r}")
    if trigger_type == "word" and len(words) != 1:
        raise InputError(f"{where}.trigger: a word trigger is one word, got {trigger!r}")
    if trigger_type == "phrase" and not 2 <= len(words) <= MAX_PHRASE_WORDS:
        raise InputError(f"{where}.trigger: a phrase trigger is 2 to {MAX_PHRASE_WORDS} words, "
                         f"got {len(words)}")


@dataclass(frozen=True)
class TrainConfig:
    """How one model is fine-tuned (defaults suit MiniLM on Rotten Tomatoes on a CPU).

    Attributes:
        epochs: passes over the (poisoned) training set.
        batch_size: examples per optimiser step.
        learning_rate: AdamW peak learning rate; None picks 1e-4 for the pretrained MiniLM
            and 5e-4 for randomly initialised families.
        weight_decay: AdamW decoupled weight decay.
        warmup_ratio: fraction of the steps over which the rate rises linearly from 0; it
            then decays linearly to 0.
        max_length: inputs are truncated to this many tokens.
        max_train_examples: cap on the clean training texts (a seeded sample), None for all.
        max_eval_examples: cap on the test texts used for clean accuracy and ASR.
        embedding_init: token-embedding initialisation of randomly initialised families
            (``random`` or ``minilm-pca``, see :func:`~trojscan.attacks.architectures.build_model`).
        size: size of randomly initialised families.
    """

    epochs: int = 2
    batch_size: int = 32
    learning_rate: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 128
    max_train_examples: int | None = None
    max_eval_examples: int = 2000
    embedding_init: str = "random"
    size: ModelSize = field(default_factory=ModelSize)

    def lr_for(self, pretrained: bool) -> float:
        """The learning rate actually used."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if pretrained else 5e-4

    def finetune(self, pretrained: bool) -> FinetuneConfig:
        """The settings of the fine-tuning run (:func:`trojscan.finetune.train_classifier`)."""
        return FinetuneConfig(epochs=self.epochs, batch_size=self.batch_size,
                              learning_rate=self.lr_for(pretrained),
                              weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio,
                              max_length=self.max_length)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    def merged(self, overrides: dict[str, Any], where: str) -> TrainConfig:
        """A copy with ``overrides`` (a ``[train]`` table) applied and validated."""
        expect_type(overrides, dict, where)
        reject_unknown(overrides, {f.name for f in fields(self)}, where)
        values = asdict(self)
        size = values.pop("size")
        if "size" in overrides:
            size_over = expect_type(overrides["size"], dict, f"{where}.size")
            reject_unknown(size_over, set(size), f"{where}.size")
            size.update(size_over)
        values.update({k: v for k, v in overrides.items() if k != "size"})
        new = TrainConfig(**values, size=ModelSize(**size))
        new.validate(where)
        return new

    def validate(self, where: str = "train") -> None:
        """Raise :class:`InputError` for values no run can use."""
        for name in ("epochs", "batch_size", "max_length", "max_eval_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{where}.{name} must be a positive integer, got {value!r}")
        if self.max_train_examples is not None and (
                isinstance(self.max_train_examples, bool)
                or not isinstance(self.max_train_examples, int) or self.max_train_examples < 1):
            raise InputError(f"{where}.max_train_examples must be a positive integer, "
                             f"got {self.max_train_examples!r}")
        if self.learning_rate is not None and not (
                isinstance(self.learning_rate, int | float) and self.learning_rate > 0):
            raise InputError(f"{where}.learning_rate must be > 0, got {self.learning_rate!r}")
        for name in ("weight_decay", "warmup_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                raise InputError(f"{where}.{name} must be in [0, 1), got {value!r}")
        if self.embedding_init not in EMBEDDING_INITS:
            raise InputError(f"{where}.embedding_init: unknown {self.embedding_init!r}; "
                             f"expected one of {', '.join(EMBEDDING_INITS)}")
        try:
            self.size.validate()
        except InputError as exc:
            raise InputError(f"{where}.{exc}") from exc
