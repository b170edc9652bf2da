"""The inverter interface: what an inversion is asked (:class:`InversionTask`), what it
returns (:class:`Inversion`), the one call every method answers (:class:`Inverter`), and the
registry that builds the method table.

Inverters only search. What a trigger does to the model and how far it is from the goal is
the subject's (:meth:`~trojscan.subjects.base.Subject.goal_loss` and
:meth:`~trojscan.subjects.base.Subject.hard_check`), so every method runs on every family
that offers a token search space.

A method is one file: a config dataclass (every knob named and documented, with
``trigger_length`` and ``epochs``) and an :class:`Inverter` subclass decorated with
:func:`register`; ``trojscan/inversion/__init__.py`` imports the file. A *variant* is a
named configuration of a method (the DBS ablations of the paper's Table 4), registered with
:func:`register_variant` beside the method: it goes wherever a method goes (``--method``,
campaigns, comparisons) and its inversions carry the method's name.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import torch

from trojscan.subjects.base import Candidate, Subject

#: Called with each finished epoch's index (0-based), for progress display.
EpochCallback = Callable[[int], None]


@dataclass(frozen=True)
class InversionTask:
    """One inversion: a trigger that makes the ``examples`` (the candidate's victims, as the
    subject reads them) reach the ``candidate``'s goal."""

    candidate: Candidate
    examples: tuple[Any, ...]


def task_generator(seed: int, candidate: Candidate) -> torch.Generator:
    """The random stream of one candidate's inversion: seeded by the run's ``seed`` and the
    candidate itself, so that a candidate draws the same numbers whether it is inverted
    alone or batched with others, first or last."""
    key = f"{seed}|{','.join(map(str, candidate.victims))}|{candidate.target}|{candidate.position}"
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class Preselection:
    """K-Arm pre-selection inside a batched run: after ``after`` epochs only the ``keep``
    tasks with the lowest loss so far go on; the others end with a ``drop`` event."""

    keep: int
    after: int


@dataclass
class Inversion:
    """One trigger inversion for one candidate.

    Attributes:
        method: the inverter's name (``dbs``, ...; a variant carries its method's).
        candidate: victim labels -> target, and the trigger position.
        trigger_ids: token ids of the reported trigger (argmax of each slot).
        trigger_tokens: the same as vocabulary tokens.
        trigger_text: the tokens as text.
        relaxed_loss: inversion loss (Eq. 3 of DBS) of the reported trigger in the convex
            hull, at the temperature it was found at.
        hard_loss: the same loss with the trigger's tokens put in as token ids.
        hard_asr: fraction of the victim examples the hard-token trigger flips to target.
        accepted: whether the trigger met the method's acceptance test (DBS: near one-hot,
            loss under the bound); when false, the reported trigger is the final state's
            argmax.
        epochs: optimisation epochs run (fewer than configured when it stopped early).
        seconds: wall time of the inversion run (shared by the tasks batched together).
        trajectory: per-epoch ``loss`` and ``temperature`` (and ``event`` at checks).
        feature_trigger: for a method that also inverts a visual trigger in box-feature
            space (TIJO), the additive feature vector ``f_adv`` the losses were measured
            with; None for a text-only trigger.
        overlay: where ``feature_trigger`` is added (TIJO's policy B: ``all`` boxes or the
            top ``one``); None without one.
    """

    method: str
    candidate: Candidate
    trigger_ids: list[int]
    trigger_tokens: list[str]
    trigger_text: str
    relaxed_loss: float
    hard_loss: float
    hard_asr: float
    accepted: bool
    epochs: int
    seconds: float
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    feature_trigger: list[float] | None = None
    overlay: str | None = None

    @property
    def loss(self) -> float:
        """The candidate's inversion loss as a scan ranks it: the relaxed loss of an accepted
        trigger; without one, the hard-token loss of the final trigger, since a relaxed loss
        that never became near one-hot is the loss of a mixture, not of a trigger."""
        return self.relaxed_loss if self.accepted else self.hard_loss

    def summary(self) -> dict[str, Any]:
        """JSON-ready fields, the candidate flattened (target, victims, position) and the
        ranking ``loss`` added; without the trajectory."""
        return {"method": self.method, "target": self.candidate.target,
                "victims": list(self.candidate.victims), "position": self.candidate.position,
                **{f.name: getattr(self, f.name) for f in fields(self)
                   if f.name not in ("method", "candidate", "trajectory")},
                "loss": self.loss}


class Inverter(ABC):
    """A trigger search. Subclasses set ``config_class`` and implement :meth:`invert`;
    :func:`register` sets ``name``.

    ``batched`` inverters invert all tasks in one run and can pre-select inside it
    (:class:`Preselection`); the scan pre-selects only with them. ``subject_classes``
    limits a method to the families it can search (empty: every family); ``token_only``
    says whether its triggers are tokens alone.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[Any]]
    batched: ClassVar[bool] = False
    subject_classes: ClassVar[tuple[type[Subject], ...]] = ()
    #: Whether the trigger is tokens only, so that the scan's token stages (the lone-token
    #: screen, shortening, measuring at other positions) measure what was inverted; False
    #: for a trigger with a part outside the text (TIJO's feature trigger).
    token_only: ClassVar[bool] = True

    def __init__(self, config: Any = None) -> None:
        self.config = self.config_class() if config is None else config
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"{self.name} needs a {self.config_class.__name__}, not a "
                            f"{type(self.config).__name__}")

    def supports(self, subject: Subject) -> bool:
        """Whether this method can search ``subject``'s family."""
        return not self.subject_classes or isinstance(subject, self.subject_classes)

    @abstractmethod
    def invert(self, subject: Subject, tasks: Sequence[InversionTask],
               on_epoch: EpochCallback | None = None,
               preselect: Preselection | None = None) -> list[Inversion]:
        """One :class:`Inversion` per task, in order. ``on_epoch`` is called with epoch
        indices 0..epochs-1 as the run progresses; ``preselect`` is for ``batched``
        inverters only."""


InverterT = TypeVar("InverterT", bound=type[Inverter])

#: Methods by name, in registration order.
METHODS: dict[str, type[Inverter]] = {}
#: Variants by name: (method, the config fields it sets).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {}


def register(name: str) -> Callable[[InverterT], InverterT]:
    """Class decorator: register an :class:`Inverter` as method ``name``."""
    def add(cls: InverterT) -> InverterT:
        if name in METHODS or name in VARIANTS:
            raise ValueError(f"inversion method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls
    return add


def register_variant(name: str, method: str, **settings: Any) -> None:
    """Register ``name`` as ``method`` with the config fields ``settings`` set."""
    if name in METHODS or name in VARIANTS:
        raise ValueError(f"inversion method {name!r} is registered twice")
    names = {f.name for f in fields(METHODS[method].config_class)}
    if set(settings) - names:
        raise ValueError(f"{method} has no option {', '.join(sorted(set(settings) - names))}")
    VARIANTS[name] = (method, settings)


def method_names() -> list[str]:
    """Every name ``--method`` takes: each method followed by its variants."""
    return [n for m in METHODS for n in (m, *(v for v, (b, _) in VARIANTS.items() if b == m))]


def method_of(name: str) -> type[Inverter]:
    """The inverter class of a method or variant ``name`` (ValueError if unknown)."""
    if name in VARIANTS:
        name = VARIANTS[name][0]
    if name not in METHODS:
        raise ValueError(f"unknown inversion method {name!r}; expected one of "
                         f"{', '.join(method_names())}")
    return METHODS[name]


def make_config(name: str, trigger_length: int | None = None, epochs: int | None = None,
                seed: int | None = None, max_evaluations: int | None = None,
                **overrides: Any) -> Any:
    """The config of method or variant ``name``: its defaults with the given options (None
    keeps a default).

    A variant's settings are applied (an override may set them back). ``seed`` goes to the
    methods that draw random numbers and is ignored by the others; ``max_evaluations`` caps
    the baselines' evaluations (:mod:`trojscan.inversion.common`) and is rejected by methods
    without such a cap. ``overrides`` are further fields of the config class. An unknown
    method or field, or a bad value, is a :class:`ValueError`.
    """
    cls = method_of(name).config_class
    names = {f.name for f in fields(cls)}
    given = {"trigger_length": trigger_length, "epochs": epochs,
             "max_evaluations": max_evaluations, **VARIANTS.get(name, ("", {}))[1], **overrides}
    options = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(unknown)}")
    if seed is not None and "seed" in names:
        options["seed"] = seed
    return cls(**options)
