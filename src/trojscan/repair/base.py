"""What every repair shares: its settings, the triggers it unlearns, and what a kind of
model must provide (:class:`RepairTask`: one per model family, beside this file)."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trojscan.errors import InputError
from trojscan.finetune import FinetuneConfig, StepCallback
from trojscan.insertion import INSERTIONS
from trojscan.manifest import PlantedTrigger
from trojscan.subjects.extractive_qa import POSITIONS as QA_INSERTIONS

#: What repair fine-tunes towards (see :class:`RepairConfig`).
OBJECTIVES = ("labels", "consistency")
#: What repair trains (see :class:`RepairConfig`).
SCOPES = ("model", "no-embeddings", "trigger-embeddings")
#: The first epoch's learning rate of each scope, unless one is given: rows of the
#: embedding matrix alone need a far higher rate to move than a whole model (on a MiniLM
#: model they unlearned at 7e-3, the whole model at 2.7e-4).
SCOPE_RATES = {"model": 3e-5, "no-embeddings": 3e-5, "trigger-embeddings": 1e-3}
#: Where a trigger goes in an NER sentence: a scan's positions (``start``, ``local``: before
#: a victim entity, ``end``) and the zoo's ``global`` (a word boundary outside every
#: entity, drawn at random).
TAGGER_INSERTIONS = ("start", "local", "end", "global")
#: Every insertion some kind of model takes (a classifier's, a tagger's, a QA model's).
ALL_INSERTIONS = tuple(dict.fromkeys((*INSERTIONS, *TAGGER_INSERTIONS, *QA_INSERTIONS)))
#: Clean examples per label a re-scan takes from the held-out set when the model directory
#: has none of its own (a scan's usual 20).
RESCAN_EXAMPLES = 20


@dataclass(frozen=True)
class RepairConfig:
    """How a model is repaired (defaults from the DBS paper's Appendix A where it gives one).

    Attributes:
        data_fraction: share of the given clean data fine-tuned on ("We use 10% of the
            training data", Appendix A). It is a share of the whole file: pass the model's
            training set for the paper's setting, or 1.0 to use all of a small file (the
            held-out set is never trained on, whatever this is).
        stamp_fraction: share of the training sample that carries the inverted trigger with
            its true label ("20% of the chosen training samples are stamped with our inverted
            trigger and marked with the correct labels", Appendix A).
        eval_fraction: share of the given data held out (per label) to measure clean
            accuracy and ASR before and after, and to guard accuracy during training; unused
            when a separate evaluation file is given.
        max_eval_examples: cap on the held-out examples (a seeded sample).
        epochs: the most passes over the training sample; each is a fine-tuning run of its
            own (AdamW, warm-up then decay) that ends with a held-out measurement and a
            possible checkpoint (not given by the paper).
        learning_rate: the first epoch's AdamW peak rate; None: the scope's
            (``SCOPE_RATES``: 3e-5 when weights of the model train, 1e-3 when only trigger
            embeddings do; not given by the paper; the zoo fine-tunes MiniLM at 1e-4, and at
            that rate unlearning every weight cost MiniLM models 3-7 points of accuracy).
        rate_growth: after an epoch that did not bring the highest scan-trigger ASR below
            ``min_progress`` times what it was before it, the next epoch's rate is this many
            times higher: the rate rises until the trigger goes, so a model gets the lowest
            rate that unlearns it (how fast a model unlearns depends on the rate it was
            trained at, which a user rarely knows). 1: a fixed rate.
        min_progress: see ``rate_growth``.
        batch_size: examples per optimiser step.
        weight_decay: AdamW decoupled weight decay (none with ``trigger-embeddings``).
        warmup_ratio: fraction of an epoch's steps over which the rate rises from 0.
        max_length: inputs are truncated to this many tokens (training and measurement), or
            to the model's position embeddings when it has fewer.
        max_accuracy_drop: the guard, in percentage points: training stops once held-out
            clean accuracy is more than this below the original model's (the issue's 3
            points; the paper's Table 2 loses 1.7 on sentiment).
        insertion: where stamped examples carry a trigger: ``scan`` (each trigger where the
            scan inverted it, the paper's "at the inserted positions") or any zoo insertion.
        objective: ``labels``, the paper's Eq. 6 as Appendix A runs it (cross-entropy with
            the true labels, stamped copies included), or ``consistency`` (ours): the same
            plus ``consistency_weight`` times the KL divergence from the original model's
            output on the example *without* the trigger to the repaired model's output on
            it (with the trigger where stamped), which keeps the clean behaviour and asks
            the trigger to change nothing.
        consistency_weight: the weight of that KL term (``consistency`` only).
        max_triggers: how many of the scan's triggers are unlearned: its best inversion,
            the short trigger that decided the verdict, then the short triggers of other
            candidates under the scan's threshold (other targets or positions of the same
            backdoor, or a second one), lowest loss first. 1 is the paper's (the best
            inverted trigger only).
        neighbours: each token of the deciding trigger is also replaced, one at a time, by
            its this many nearest tokens in the model's input embeddings (cosine), and a
            ``neighbour_share`` of the stamped examples carry such a variant: a scan that
            inverted a look-alike (U+203A for ``>``) still unlearns the neighbourhood of
            the true trigger. 0: none (the paper's).
        neighbour_share: share of the stamped examples that carry a neighbour variant
            instead of one of the scan's triggers (when ``neighbours`` > 0).
        target_asr: training stops once every unlearned scan trigger's held-out ASR is at
            most this (measured after every epoch, within the accuracy margin); ``epochs``
            is then a ceiling. A negative value never stops early (a fixed epoch count).
        scope: what trains: ``trigger-embeddings`` (ours, the default: only the
            input-embedding rows of the tokens of the unlearned triggers and their
            neighbours; the model is exactly unchanged on any text without those tokens, so
            the trigger is unlearned where it enters the model at no cost to other inputs;
            it cannot reach a true trigger none of whose tokens the scan found),
            ``model`` (every weight, the paper's) or ``no-embeddings`` (every weight but
            the token, position and type embeddings).
        rescan: after unlearning, scan the repaired model again (ours): with the settings
            the scan's result records, on the model directory's clean examples (else
            ``RESCAN_EXAMPLES`` per label of the held-out set); the report gives its verdict,
            and a round that leaves a backdoor the re-scan finds is followed by another.
        rounds: the most rounds of unlearning (ours): each unlearns what the scans so far
            found (the scan's triggers, then each re-scan's new ones, and their
            neighbours) from the model as the last round left it, and ends with a re-scan;
            the repair ends when a re-scan says clean, a round's kept model is beyond the
            accuracy margin, or after this many rounds. A re-scan finds the rest of a
            phrase trigger whose one word the scan found (its other words still fire once
            that one is unlearned), or a second backdoor. 1: one round (the paper's).
        residual_factor: a re-scan that says clean still leads to another round when its
            deciding trigger points at a target the repair unlearned and its score is
            under this many times the threshold (ours): the model is known to have had a
            backdoor there, so a near miss at the same target is more likely what is left
            of it than a natural feature. Chosen from two MiniLM models (README "Repair"):
            the rest of `voyage wagon` re-scanned at 1.02 times the threshold, the
            natural word the other re-scan ended on at 1.8 times. 1: the verdict alone.
        companion_gap: with a base model (the public model the suspect was fine-tuned
            from; :mod:`trojscan.repair.companions`), a found trigger token's companions
            (ours) are the tokens whose embedding drift from the base projects highest on
            the token's own drift, down to the first step of at least this many times from
            one to the next among the ``max_companions`` + 1 highest: the other words of a
            phrase trigger stand apart from the words the clean task moved. Repair
            unlearns the deciding trigger with its companions, and the companions alone.
            Chosen from the repair zoo's MiniLM models (README "Repair"): the phrases'
            other words stood 1.51 and 1.86 times over the next row, the clean task's
            words at most 1.22 times.
        max_companions: at most this many companions per trigger token.
        composites: also unlearn the composites of what the scans found
            (:mod:`trojscan.repair.composites`, ours): the deciding trigger grown by one
            token of its inversion on either side, and, after the first round, joined with
            the earlier rounds' deciding triggers at the same target, for a planted
            trigger of two parts of which a scan found one (``^`` of ``^}``). On by
            default: on the 9 MiniLM models of the repair zoo it took the two character
            triggers of two parts from 0.324 and 0.312 to 0.000 and 0.036, the mean true
            ASR from 0.084 to 0.012, at 0.14 points of accuracy (README "Repair").
        seed: seeds the data split, the stamped sample, trigger insertion, shuffling and
            dropout.
    """

    data_fraction: float = 1.0
    stamp_fraction: float = 0.2
    eval_fraction: float = 0.2
    max_eval_examples: int = 2000
    epochs: int = 8
    learning_rate: float | None = None
    rate_growth: float = 3.0
    min_progress: float = 0.5
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 128
    max_accuracy_drop: float = 3.0
    insertion: str = "scan"
    objective: str = "consistency"
    consistency_weight: float = 1.0
    max_triggers: int = 4
    neighbours: int = 4
    neighbour_share: float = 0.5
    target_asr: float = 0.02
    scope: str = "trigger-embeddings"
    rescan: bool = True
    rounds: int = 3
    residual_factor: float = 1.5
    companion_gap: float = 1.4
    max_companions: int = 4
    composites: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("data_fraction", "stamp_fraction"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise InputError(f"{name} must be in (0, 1], got {value}")
        if not 0 < self.eval_fraction < 1:
            raise InputError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        for name in ("max_eval_examples", "epochs", "batch_size", "max_length",
                     "max_triggers", "rounds", "max_companions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise InputError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.rate_growth >= 1 or not 0 < self.min_progress <= 1:
            raise InputError(f"rate_growth must be >= 1 and min_progress in (0, 1], got "
                             f"{self.rate_growth} and {self.min_progress}")
        if not 0 <= self.weight_decay < 1 or not 0 <= self.warmup_ratio < 1:
            raise InputError("weight_decay and warmup_ratio must be in [0, 1)")
        if self.insertion not in ("scan", *ALL_INSERTIONS):
            raise InputError(f"unknown insertion {self.insertion!r}; expected scan or one of "
                             + ", ".join(ALL_INSERTIONS))
        if self.scope not in SCOPES:
            raise InputError(f"unknown scope {self.scope!r}; expected one of "
                             + ", ".join(SCOPES))
        if self.objective not in OBJECTIVES:
            raise InputError(f"unknown objective {self.objective!r}; expected one of "
                             + ", ".join(OBJECTIVES))
        if not self.consistency_weight >= 0:
            raise InputError(f"consistency_weight must be >= 0, got {self.consistency_weight}")
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) \
                or self.neighbours < 0:
            raise InputError(f"neighbours must be an integer >= 0, got {self.neighbours!r}")
        if not self.residual_factor >= 1:
            raise InputError(f"residual_factor must be >= 1, got {self.residual_factor}")
        if not self.companion_gap > 1:
            raise InputError(f"companion_gap must be > 1, got {self.companion_gap}")
        if not 0 <= self.neighbour_share <= 1:
            raise InputError(f"neighbour_share must be in [0, 1], got {self.neighbour_share}")
        if self.rounds > 1 and not self.rescan:
            raise InputError("more than one round needs the re-scan (rescan) that finds what "
                             "the next round unlearns")
        if not self.target_asr < 1:
            raise InputError(f"target_asr must be < 1, got {self.target_asr}")
        if not self.max_accuracy_drop >= 0:
            raise InputError(f"max_accuracy_drop must be >= 0 points, got "
                             f"{self.max_accuracy_drop}")

    def epoch_run(self, learning_rate: float) -> FinetuneConfig:
        """One epoch's fine-tuning settings at ``learning_rate``, as
        :func:`~trojscan.finetune.train_classifier` takes them (no weight decay when only
        trigger embeddings train: it would shrink every other row of the matrix too)."""
        decay = 0.0 if self.scope == "trigger-embeddings" else self.weight_decay
        return FinetuneConfig(epochs=1, batch_size=self.batch_size,
                              learning_rate=learning_rate, weight_decay=decay,
                              warmup_ratio=self.warmup_ratio, max_length=self.max_length)


@dataclass(frozen=True)
class Unlearned:
    """A trigger repair stamps: its text, where it goes, the target and victims it was
    inverted for, and where it came from (``inverted``: the scan's best inversion,
    ``short``: the short trigger that decided the verdict, ``candidate``: another
    candidate's short trigger under the threshold, ``neighbour``: a variant of the deciding
    trigger with one token replaced by a near embedding, ``companion``: with its companions
    from a base model, ``extension`` / ``compound``: a composite of what the scans found,
    :mod:`trojscan.repair.composites`)."""

    trigger: PlantedTrigger
    source: str


def stampable(tok: Any, size: int) -> torch.Tensor:
    """(size,) True for the tokens that text inserted as words reproduces: not special
    (``[CLS]``), unused (``[unused0]``) or word-piece (``##s``) tokens."""
    vocab = tok.convert_ids_to_tokens(list(range(size)))
    return torch.tensor([not t.startswith(("##", "[")) for t in vocab])


class RepairTask(ABC):
    """What repair does differently for each kind of model: how its data splits, where a
    trigger goes in an example, how it trains, and what clean quality and attack success
    are. The flow (:func:`trojscan.repair.repair`) is the same for all.

    An *item* is what one training step reads: an example, with a trigger inserted or not.
    """

    #: What the clean score measures (``accuracy``, ``entity_f1``), for the report.
    metric: str
    #: Where a trigger can be inserted (``RepairConfig.insertion`` other than ``scan``).
    insertions: tuple[str, ...]

    def __init__(self, subject: Any, config: RepairConfig) -> None:
        self.subject, self.config = subject, config
        self.model, self.tok = subject.model, subject.tokenizer

    #: What the examples are called in messages (``examples``, ``sentences``).
    noun: str = "examples"

    @abstractmethod
    def strata(self, rows: Sequence[Any]) -> list[list[Any]]:
        """The groups the held-out set and the training sample are drawn from in equal
        shares (one per label for a classifier)."""

    def split(self, rows: Sequence[Any], eval_rows: Sequence[Any] | None
              ) -> tuple[list[Any], list[Any]]:
        """(training sample, held-out set) of the clean ``rows``, drawn from each of the
        :meth:`strata` with the seed: the held-out set is ``eval_fraction`` of each (at
        most ``max_eval_examples`` in all), or a sample of ``eval_rows`` when given; the
        training sample is ``data_fraction`` of each, from what is not held out."""
        config = self.config
        rng = random.Random(config.seed)
        held_share = 0.0 if eval_rows is not None else min(
            config.eval_fraction, config.max_eval_examples / len(rows))
        train: list[Any] = []
        held: list[Any] = []
        for pool in self.strata(rows):
            rng.shuffle(pool)
            n_held = round(held_share * len(pool))
            n_train = min(max(1, round(config.data_fraction * len(pool))), len(pool) - n_held)
            held += pool[:n_held]
            train += pool[n_held : n_held + n_train]
        if eval_rows is not None:
            held = list(eval_rows)
            if len(held) > config.max_eval_examples:
                held = rng.sample(held, config.max_eval_examples)
        if not train or not held:
            raise InputError(f"{len(rows)} clean {self.noun} are too few to both train on and "
                             "hold out: give more data, a larger data fraction or a separate "
                             "evaluation file")
        rng.shuffle(train)
        return train, held

    @abstractmethod
    def item(self, example: Any, trigger: PlantedTrigger | None, where: str,
             rng: random.Random) -> Any:
        """The training item of ``example``: with ``trigger`` inserted at ``where`` and the
        true labels kept, or as it is (``trigger`` None)."""

    @abstractmethod
    def originals(self, train: Sequence[Any]) -> Any:
        """The original model's outputs on the (unstamped) training sample, the
        consistency term's teacher."""

    @abstractmethod
    def train(self, items: Sequence[Any], teacher: Any, settings: FinetuneConfig, seed: int,
              on_step: StepCallback) -> None:
        """One fine-tuning run of the model on ``items`` (``teacher``: :meth:`originals`
        of the items' examples, or None without the consistency term)."""

    @abstractmethod
    def predictions(self, held: Sequence[Any]) -> list[Any]:
        """The model's predictions on the held-out set."""

    @abstractmethod
    def clean_score(self, held: Sequence[Any], predictions: Sequence[Any]) -> float:
        """Clean quality of those predictions (:attr:`metric`)."""

    @abstractmethod
    def asr(self, held: Sequence[Any], predictions: Sequence[Any],
            trigger: PlantedTrigger) -> float | None:
        """The attack success rate of ``trigger`` on the held-out victims the model gets
        right without it; None when there are none."""

    @abstractmethod
    def victims_as_target(self, held: Sequence[Any], predictions: Sequence[Any],
                          trigger: PlantedTrigger) -> float:
        """The share of the held-out victims the model already puts in the target without
        any trigger (no repair can fix those)."""

    @abstractmethod
    def has_victims(self, held: Sequence[Any], trigger: PlantedTrigger) -> bool:
        """Whether the held-out set has a victim of ``trigger`` at all."""

    @abstractmethod
    def rescan_sample(self, held: Sequence[Any]) -> list[Any]:
        """Clean examples for a re-scan when the model directory has none: the first
        ``RESCAN_EXAMPLES`` of each label (entity type) of the held-out set."""
