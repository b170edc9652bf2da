"""Backdoor removal: unlearning with the inverted trigger (DBS Section 3.2.3, Eq. 6).

Eq. 6 of the paper fine-tunes the model on clean data D' while pushing the loss of the
inverted trigger t-hat towards its target up; in practice (Appendix A) that is plain
fine-tuning on "10% of the training data [where] 20% of the chosen training samples are
stamped with our inverted trigger and marked with the correct labels". :func:`repair` does
exactly that, with the scan's best trigger inserted (as text, at the scan's trigger
position) into a seeded sample of the clean data, and guards the result:

* the data is split (per label, seeded) into a held-out set, never trained on, that
  measures clean accuracy and attack success rate (ASR) before and after every epoch, and
  the training sample;
* training stops once held-out clean accuracy falls more than ``max_accuracy_drop`` points
  below the original model's, and the best checkpoint is kept: of the epochs within the
  margin the one with the lowest ASR of the inverted trigger (then the highest accuracy);
  when no epoch is within it, the one with the highest accuracy, and the report says so;
* a scan that found no backdoor is refused unless forced; the input directory is only read;
  the repaired model is built in a temporary directory beside ``out_dir`` and renamed into
  place, so ``out_dir`` holds a complete model or nothing.

Beyond the paper, repair works in rounds: the repaired model is scanned again (with the
scan's settings) and, while the re-scan finds a backdoor, what it finds is unlearned too,
from the model as the last round left it. A scan that found one word of a phrase trigger
leaves the other words firing; the re-scan finds them. The report gives the last
re-scan's verdict.

The scan must be of this very model: a result that names its model (format version 2)
is refused when the SHA-256 of ``model_dir``'s weights differs. The ground truth of a zoo
model (its manifest entry) is used only to report the ASR of the true trigger; it never
steers the repair. Only text classifiers are repaired so far.
"""

from __future__ import annotations

import math
import os
import random
import secrets
import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trojscan.errors import InputError
from trojscan.finetune import (
    FinetuneConfig,
    TrainItem,
    logits,
    predict,
    train_classifier,
    trigger_effect,
)
from trojscan.fsutil import atomic_write_json, check_writable
from trojscan.insertion import INSERTIONS, insert_trigger
from trojscan.manifest import Manifest, PlantedTrigger, planted_trigger
from trojscan.modeldir import EXAMPLES_FILE
from trojscan.results import ScanResult, library_versions, read_result
from trojscan.scan import ProgressCallback, ScanConfig, scan_subject
from trojscan.subjects.huggingface import token_limit
from trojscan.subjects.loading import load_subject
from trojscan.subjects.text_classification import (
    POSITIONS,
    TextClassificationSubject,
    TextExample,
)

REPORT_VERSION = 3
#: What repair fine-tunes towards (see :class:`RepairConfig`).
OBJECTIVES = ("labels", "consistency")
#: What repair trains (see :class:`RepairConfig`).
SCOPES = ("model", "no-embeddings", "trigger-embeddings")
#: The first epoch's learning rate of each scope, unless one is given: rows of the
#: embedding matrix alone need a far higher rate to move than a whole model (on a MiniLM
#: model they unlearned at 7e-3, the whole model at 2.7e-4).
SCOPE_RATES = {"model": 3e-5, "no-embeddings": 3e-5, "trigger-embeddings": 1e-3}
#: Clean examples per label a re-scan takes from the held-out set when the model directory
#: has none of its own (a scan's usual 20).
RESCAN_EXAMPLES = 20
#: The report written into every repaired model directory.
REPORT_FILE = "repair.json"


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
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("data_fraction", "stamp_fraction"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise InputError(f"{name} must be in (0, 1], got {value}")
        if not 0 < self.eval_fraction < 1:
            raise InputError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        for name in ("max_eval_examples", "epochs", "batch_size", "max_length",
                     "max_triggers", "rounds"):
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
        if self.insertion != "scan" and self.insertion not in INSERTIONS:
            raise InputError(f"unknown insertion {self.insertion!r}; expected scan or one of "
                             + ", ".join(INSERTIONS))
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


def read_scan(path: Path) -> ScanResult:
    """Read a scan result (``trojscan scan --out``) and check the fields repair uses."""
    result = read_result(Path(path))
    check_scan(result, f"scan result {path}")
    return result


def check_scan(result: ScanResult, where: str = "scan result") -> None:
    """Raise :class:`InputError` unless ``result``'s best trigger is one repair can stamp."""
    best = result.best
    if best.position not in POSITIONS or not best.victims:
        raise InputError(f"{where}: best lacks a valid position (one of "
                         + ", ".join(POSITIONS) + ") or victims")


def read_truth(manifest: Path, model_id: str) -> dict[str, Any]:
    """The entry of ``model_id`` in a zoo manifest (``trojscan zoo build``'s ground truth)."""
    entry = Manifest.load(Path(manifest)).models.get(model_id)
    if entry is None:
        raise InputError(f"manifest {manifest} has no model {model_id!r} "
                         "(give its id with --model-id)")
    planted_trigger(entry, len(entry.get("labels") or []), f"manifest {manifest}: {model_id}")
    return entry


@dataclass(frozen=True)
class Unlearned:
    """A trigger repair stamps: its text, where it goes, the target and victims it was
    inverted for, and where it came from (``inverted``: the scan's best inversion,
    ``short``: the short trigger that decided the verdict, ``candidate``: another
    candidate's short trigger under the threshold, ``neighbour``: a variant of the deciding
    trigger with one token replaced by a near embedding)."""

    trigger: PlantedTrigger
    source: str


def _fits(target: int, victims: tuple[int, ...], n_labels: int) -> bool:
    others = tuple(y for y in range(n_labels) if y != target)
    return 0 <= target < n_labels and set(victims) <= set(others) and bool(victims)


def _inverted_trigger(result: ScanResult, n_labels: int) -> PlantedTrigger:
    """The scan's best trigger as a trigger to stamp: its text at its position, victims ->
    target."""
    best = result.best
    target, victims = best.target, tuple(sorted(set(best.victims)))
    others = tuple(y for y in range(n_labels) if y != target)
    if not _fits(target, victims, n_labels):
        raise InputError(f"the scan's target {target} / victims {list(victims)} do not fit a "
                         f"model with {n_labels} labels: is it the scan of another model?")
    if victims != others and len(victims) != 1:
        raise InputError(f"the scan's victims {list(victims)} are neither one label nor all "
                         "others")
    return PlantedTrigger(" ".join(best.trigger_text.split()), best.position, target, victims)


def scan_triggers(result: ScanResult, n_labels: int, max_triggers: int) -> list[Unlearned]:
    """The scan's triggers to unlearn, at most ``max_triggers``: its best inversion, the
    short trigger that decided the verdict, then, for each other candidate with a short
    trigger (shortened or screened) under the scan's threshold, its shortest such trigger,
    lowest loss first; the same text at the same position and target only once."""
    best = _inverted_trigger(result, n_labels)
    found = [Unlearned(best, "inverted")]
    if result.short_trigger is not None:
        found.append(Unlearned(replace(best, trigger=" ".join(
            result.short_trigger.trigger_text.split())), "short"))
    shortest = []
    for c in result.candidates:
        under = [t for t in c.short_triggers() if t.loss < result.threshold]
        if under:
            shortest.append((c, min(under, key=lambda t: (t.length, t.loss))))
    for c, t in sorted(shortest, key=lambda r: r[1].loss):
        victims = tuple(sorted(set(c.victims)))
        if c.position in POSITIONS and _fits(c.target, victims, n_labels):
            found.append(Unlearned(PlantedTrigger(" ".join(t.trigger_text.split()), c.position,
                                                  c.target, victims), "candidate"))
    unique: dict[tuple[str, str, int], Unlearned] = {}
    for u in found:
        if u.trigger.trigger:
            unique.setdefault((u.trigger.trigger, u.trigger.insertion, u.trigger.target), u)
    return list(unique.values())[:max_triggers]


def neighbour_triggers(result: ScanResult, best: PlantedTrigger, tok: Any,
                       embeddings: torch.Tensor, k: int) -> list[Unlearned]:
    """Variants of the deciding trigger (the short one, else the best inversion), at the
    position, target and victims of ``best`` (the scan's best trigger, whose candidate the
    short one belongs to): each of its tokens replaced, one at a time, by each of its ``k``
    nearest tokens by cosine similarity of ``embeddings`` (the model's input embeddings),
    leaving out special, unused and word-piece (``##``) tokens and the trigger's own."""
    if k == 0:
        return []
    ids = list(result.short_trigger.trigger_ids if result.short_trigger is not None
               else result.best.trigger_ids)
    vocab = tok.convert_ids_to_tokens(list(range(embeddings.shape[0])))
    usable = torch.tensor([not (t.startswith(("##", "[")) or i in ids)
                           for i, t in enumerate(vocab)])
    unit = F.normalize(embeddings.detach().float().cpu(), dim=-1)
    variants: list[Unlearned] = []
    for j, token in enumerate(ids):
        similarity = (unit @ unit[token]).masked_fill(~usable, -2.0)
        for near in similarity.topk(k).indices.tolist():
            text = " ".join(tok.decode([*ids[:j], near, *ids[j + 1:]]).split())
            if text:
                variants.append(Unlearned(replace(best, trigger=text), "neighbour"))
    return variants


def _trained_ids(tok: Any, triggers: Sequence[Unlearned]) -> list[int]:
    """The token ids of the ``triggers``' texts (special tokens left out). Inserted as words,
    a trigger follows a space: a byte-level BPE (GPT-2) spells " word" with other tokens than
    "word", so both spellings count."""
    special = set(tok.all_special_ids)
    return sorted({i for u in triggers for text in (u.trigger.trigger, " " + u.trigger.trigger)
                   for i in tok(text, add_special_tokens=False)["input_ids"]} - special)


def _trained_tokens(tok: Any, triggers: Sequence[Unlearned]) -> list[str]:
    """The tokens whose embedding rows ``trigger-embeddings`` trains for ``triggers``."""
    return tok.convert_ids_to_tokens(_trained_ids(tok, triggers))


def _set_scope(model: Any, tok: Any, triggers: Sequence[Unlearned], scope: str) -> Any:
    """Mark what trains (see :attr:`RepairConfig.scope`). For ``trigger-embeddings`` only
    the embedding rows of the triggers' tokens do: a gradient hook zeroes every other row
    (and the run has no weight decay, so those rows stay exactly as they are); its handle
    is returned (None for the other scopes), to be removed when the round ends."""
    for p in model.parameters():
        p.requires_grad_(scope != "trigger-embeddings")
    if scope == "no-embeddings":
        embeddings = getattr(model.base_model, "embeddings", model.get_input_embeddings())
        for p in embeddings.parameters():
            p.requires_grad_(False)
    if scope != "trigger-embeddings":
        return None
    weight = model.get_input_embeddings().weight
    rows = torch.zeros(weight.shape[0], 1, device=weight.device)
    rows[_trained_ids(tok, triggers)] = 1.0
    weight.requires_grad_(True)
    return weight.register_hook(lambda grad: grad * rows)


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _check_outputs(model_dir: Path, out_dir: Path, report_path: Path | None) -> None:
    if _inside(out_dir, model_dir):
        raise InputError(f"--out {out_dir} is the model directory {model_dir} or inside it; "
                         "repair never writes into the input model")
    if report_path is not None and _inside(report_path, model_dir):
        raise InputError(f"--report {report_path} is inside the model directory {model_dir}; "
                         "repair never writes into the input model")
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise InputError(f"--out {out_dir} exists and is not an empty directory; choose a new "
                         "one")
    check_writable(out_dir, "--out", directory=True)
    if report_path is not None:
        check_writable(report_path, "--report")


def split_data(rows: Sequence[TextExample], config: RepairConfig,
               eval_rows: Sequence[TextExample] | None = None,
               ) -> tuple[list[TextExample], list[TextExample]]:
    """(training sample, held-out set) of the clean ``rows``, drawn per label with the seed.

    The held-out set is ``eval_fraction`` of every label (at most ``max_eval_examples`` in
    all), or a sample of ``eval_rows`` when given; the training sample is ``data_fraction``
    of every label of ``rows``, from what is not held out.
    """
    rng = random.Random(config.seed)
    by_label: dict[int, list[TextExample]] = defaultdict(list)
    for row in rows:
        by_label[row.label].append(row)
    held_share = 0.0 if eval_rows is not None else min(
        config.eval_fraction, config.max_eval_examples / len(rows))
    train: list[TextExample] = []
    held: list[TextExample] = []
    for label in sorted(by_label):
        pool = by_label[label]
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
        raise InputError(f"{len(rows)} clean examples are too few to both train on and hold "
                         "out: give more data, a larger data fraction or a separate "
                         "evaluation file")
    rng.shuffle(train)
    return train, held


def stamp(train: Sequence[TextExample], triggers: Sequence[Unlearned],
          neighbours: Sequence[Unlearned], config: RepairConfig
          ) -> tuple[list[TrainItem], int]:
    """The training items: ``stamp_fraction`` of ``train`` (a seeded sample) with a trigger
    inserted and their true label kept; returns (items, stamped count). Each stamped
    example carries one of the scan's ``triggers`` (uniformly) or, for a
    ``neighbour_share`` of them, one of the ``neighbours``, where that trigger was inverted
    (or at ``config.insertion``)."""
    rng = random.Random(config.seed + 1)
    n_stamped = max(1, round(config.stamp_fraction * len(train)))
    chosen = set(rng.sample(range(len(train)), n_stamped))
    items = []
    for i, e in enumerate(train):
        text = e.text
        if i in chosen:
            pool = neighbours if neighbours and rng.random() < config.neighbour_share \
                else triggers
            trigger = rng.choice(pool).trigger
            where = trigger.insertion if config.insertion == "scan" else config.insertion
            text = insert_trigger(text, trigger.trigger, where, rng)
        items.append(TrainItem(text, e.label))
    return items, n_stamped


class _Measure:
    """Held-out clean accuracy and the ASR of the unlearned (and the true) triggers.

    ASR counts the held-out victim examples the model classifies correctly without the
    trigger: the share of them the trigger flips to the target. A victim the model already
    puts in the target class is no success of the trigger, and no repair can fix it; their
    share (for the scan's best trigger's victims) is reported as ``victims_as_target``.
    ``inverted_asr`` is the highest ASR of the scan's triggers (what repair must bring
    down), ``trigger_asr`` each one's, in order.
    """

    def __init__(self, tok: Any, held: list[TextExample], triggers: Sequence[Unlearned],
                 truth: PlantedTrigger | None, config: RepairConfig) -> None:
        self.tok, self.held, self.triggers, self.truth = tok, held, triggers, truth
        self.config = config
        present = {e.label for e in held}
        for trigger, what in ((triggers[0].trigger, "inverted"), (truth, "true")):
            if trigger is not None and not set(trigger.victims) & present:
                raise InputError(f"the held-out examples have no example of the {what} "
                                 f"trigger's victim label(s) {list(trigger.victims)}")

    def _asr(self, model: Any, trigger: PlantedTrigger, preds: list[int]) -> float | None:
        correct = [e.text for e, p in zip(self.held, preds, strict=True)
                   if e.label in trigger.victims and p == e.label]
        if not correct:
            return None
        return trigger_effect(model, self.tok, correct, trigger.trigger, trigger.insertion,
                              trigger.target, self.config.max_length, self.config.seed)[0]

    def _preds(self, model: Any) -> list[int]:
        return predict(model, self.tok, [e.text for e in self.held], self.config.max_length)

    def __call__(self, model: Any, variants: Sequence[Unlearned] = ()) -> dict[str, Any]:
        """The measurements; with ``variants``, also their ASR (``neighbour_asr``), from
        the same held-out predictions."""
        preds = self._preds(model)
        first = self.triggers[0].trigger
        victims = [p for e, p in zip(self.held, preds, strict=True) if e.label in first.victims]
        rates = [self._asr(model, u.trigger, preds) for u in self.triggers]
        measured = [r for r in rates if r is not None]
        row = {
            "clean_accuracy": sum(p == e.label for e, p in zip(self.held, preds, strict=True))
            / len(self.held),
            "inverted_asr": max(measured) if measured else None,
            "trigger_asr": rates,
            "true_asr": None if self.truth is None else self._asr(model, self.truth, preds),
            "victims_as_target": sum(p == first.target for p in victims) / len(victims),
        }
        if variants:
            row["neighbour_asr"] = [self._asr(model, u.trigger, preds) for u in variants]
        return row

    def neighbourhood(self, model: Any, variants: Sequence[Unlearned]) -> list[float | None]:
        """The ASR of each neighbour variant."""
        preds = self._preds(model)
        return [self._asr(model, u.trigger, preds) for u in variants]


def _rank(row: dict[str, Any]) -> tuple[float, ...]:
    """Checkpoint order, lower is better: within the margin by inverted-trigger ASR, then
    accuracy; beyond it (only when nothing is within) by accuracy."""
    asr = 1.0 if row["inverted_asr"] is None else row["inverted_asr"]  # no victim left right
    if row["within_margin"]:
        return (0, asr, -row["clean_accuracy"], row["epoch"])
    return (1, -row["clean_accuracy"], asr, row["epoch"])


def best_epoch(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The epoch whose checkpoint repair keeps: of those within the accuracy margin the one
    with the lowest ASR of the scan's triggers (then the highest accuracy, then the
    earliest); when none is within it, the one with the highest accuracy. An epoch with no
    measurable ASR (no victim left classified right) counts as ASR 1."""
    return min(history, key=_rank)


def _key(u: Unlearned) -> tuple[str, str, int]:
    return u.trigger.trigger, u.trigger.insertion, u.trigger.target


def _new(found: Sequence[Unlearned], known: Sequence[Unlearned]) -> list[Unlearned]:
    """The triggers of ``found`` not already in ``known`` (same text, position, target)."""
    seen = {_key(u) for u in known}
    return [u for u in found if _key(u) not in seen and not seen.add(_key(u))]


def is_residual(rescan: ScanResult, unlearned: Sequence[Unlearned], factor: float) -> bool:
    """Whether a re-scan that says clean found what is left of an unlearned backdoor: its
    deciding trigger's target is one a trigger was unlearned for, and its score is under
    ``factor`` times its threshold (see :attr:`RepairConfig.residual_factor`)."""
    return (rescan.verdict == "clean" and rescan.short_trigger is not None
            and rescan.best.target in {u.trigger.target for u in unlearned}
            and rescan.score < factor * rescan.threshold)


def _scan_summary(result: ScanResult) -> dict[str, Any]:
    """What a report says of a scan: its verdict, score and threshold, and its triggers."""
    short = result.short_trigger
    return {"verdict": result.verdict, "score": result.score, "threshold": result.threshold,
            "trigger_text": result.best.trigger_text,
            "short_trigger": None if short is None else short.trigger_text,
            "target": result.best.target, "position": result.best.position,
            "seconds": result.seconds}


def _rescan_examples(model_dir: Path, subject: TextClassificationSubject,
                     held: Sequence[TextExample]) -> list[TextExample]:
    """The clean examples a re-scan uses: the model directory's own (what a scan of it
    takes by default), else the first ``RESCAN_EXAMPLES`` of each label of the held-out
    set."""
    if (model_dir / EXAMPLES_FILE).is_file():
        return subject.read_examples(model_dir / EXAMPLES_FILE)
    by_label: dict[int, list[TextExample]] = defaultdict(list)
    for e in held:
        if len(by_label[e.label]) < RESCAN_EXAMPLES:
            by_label[e.label].append(e)
    return [e for label in sorted(by_label) for e in by_label[label]]


def _stage(progress: ProgressCallback | None, name: str) -> ProgressCallback | None:
    """``progress`` with ``name`` before what it says."""
    if progress is None:
        return None
    return lambda done, total, what: progress(done, total, f"{name}: {what}")


def _unlearn(model: Any, tok: Any, items: list[TrainItem], soft: torch.Tensor | None,
             measure: _Measure, trained: Sequence[Unlearned], config: RepairConfig,
             accuracy: float,
             start: dict[str, Any], round_no: int, progress: ProgressCallback | None,
             ) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """One round of unlearning: up to ``config.epochs`` epochs, each its own fine-tuning
    run at a rate that rises while the scan triggers' ASR falls too slowly, each measured
    on the held-out set (the drop against ``accuracy``, the original model's); the best
    checkpoint (:func:`best_epoch`; after the first round the model as the round found it,
    ``start``, competes as epoch 0, and is the first row) is loaded. Returns (the rows,
    the kept row, why it stopped: ``target_asr``, ``accuracy_guard`` or ``epochs``)."""
    hook = _set_scope(model, tok, trained, config.scope)
    steps_per_epoch = math.ceil(len(items) / config.batch_size)
    total = steps_per_epoch * config.epochs
    history: list[dict[str, Any]] = []
    kept: dict[str, Any] = {}
    if round_no > 1:
        row = {"round": round_no, "epoch": 0, "learning_rate": 0.0, **start,
               "accuracy_drop_points": round(100 * (accuracy - start["clean_accuracy"]), 9)}
        row["within_margin"] = row["accuracy_drop_points"] <= config.max_accuracy_drop
        history.append(row)
        kept.update(row=row, state={k: v.detach().to("cpu", copy=True)
                                    for k, v in model.state_dict().items()})
    rate = config.learning_rate or SCOPE_RATES[config.scope]
    stop = "epochs"
    previous = 1.0 if start["inverted_asr"] is None else start["inverted_asr"]
    for epoch in range(1, config.epochs + 1):
        done = (epoch - 1) * steps_per_epoch

        def on_step(step: int, _: int, done: int = done, epoch: int = epoch) -> None:
            if progress:
                progress(done + step, total, f"round {round_no}: unlearning, epoch {epoch}")

        train_classifier(model, tok, items, config.epoch_run(rate), config.seed + epoch,
                         on_step=on_step, soft_targets=soft,
                         consistency=config.consistency_weight)
        row = {"round": round_no, "epoch": epoch, "learning_rate": rate, **measure(model)}
        drop = round(100 * (accuracy - row["clean_accuracy"]), 9)
        row.update(accuracy_drop_points=drop, within_margin=drop <= config.max_accuracy_drop)
        history.append(row)
        if not kept or best_epoch([kept["row"], row]) is row:
            kept.update(row=row, state={k: v.detach().to("cpu", copy=True)
                                        for k, v in model.state_dict().items()})
        asr = 1.0 if row["inverted_asr"] is None else row["inverted_asr"]
        if not row["within_margin"]:
            stop = "accuracy_guard"
            break
        if asr <= config.target_asr:
            stop = "target_asr"
            break
        if asr > config.min_progress * previous:  # too slow: a higher rate next epoch
            rate *= config.rate_growth
        previous = asr
    if hook is not None:
        hook.remove()
    model.load_state_dict(kept["state"])
    model.eval()
    return history, kept["row"], stop


def repair(
    model_dir: Path,
    scan_result: ScanResult,
    data: Path,
    out_dir: Path,
    config: RepairConfig | None = None,
    force: bool = False,
    truth: dict[str, Any] | None = None,
    eval_data: Path | None = None,
    report_path: Path | None = None,
    device: str = "cpu",
    allow_pickle: bool = False,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Unlearn the backdoor the scan found in ``model_dir``; write the repaired model.

    Args:
        model_dir: the Hugging Face model directory; only read.
        scan_result: its scan result (:func:`trojscan.scan.scan`, or :func:`read_scan`).
        data: clean labelled examples, JSON Lines of ``{"text", "label"}`` as a scan's.
        out_dir: the repaired model directory: must not exist (or be empty) and not be
            ``model_dir`` or inside it. It receives ``config.json``, ``model.safetensors``,
            the tokenizer, the model's ``clean_examples.jsonl`` when it has one, and the
            report as ``repair.json``.
        config: the knobs (see :class:`RepairConfig`).
        force: repair even when the scan's verdict is clean (its best candidate is
            unlearned).
        truth: the model's zoo manifest entry (:func:`read_truth`): the true trigger's ASR
            is reported, nothing else uses it.
        eval_data: a separate JSONL file to hold out instead of a share of ``data``.
        report_path: also write the report here (JSON, atomically).
        device: where the model trains (``cpu``, ``cuda``, ``cuda:N``).
        allow_pickle: also load pickled weights (see
            :func:`~trojscan.subjects.loading.load_subject`); the repaired model is always
            written as safetensors.
        progress: called with (steps done, steps in all, what is running).

    Returns:
        The report: the scan's trigger, data sizes, ``before`` / ``after`` held-out clean
        accuracy and ASR (``inverted_asr``, and ``true_asr`` with ``truth``), the accuracy
        drop in points, whether it is within the margin, whether training stopped early,
        the kept epoch and every epoch's measurements (``history``).

    Raises:
        InputError: bad input, a scan of another model, a scan that found no backdoor
            (without ``force``), or outputs that would touch ``model_dir`` or cannot be
            written; nothing is written then.
    """
    config = config or RepairConfig()
    started = time.perf_counter()
    model_dir, out_dir, data = Path(model_dir), Path(out_dir), Path(data)
    check_scan(scan_result)
    best = scan_result.best
    if not best.trigger_text.strip():
        raise InputError("the scan's best trigger is empty: nothing to unlearn")
    if scan_result.verdict != "trojaned" and not force:
        raise InputError(f"the scan found no backdoor (verdict {scan_result.verdict}, score "
                         f"{scan_result.score}); pass --force to unlearn its best "
                         f"candidate {best.trigger_text!r} anyway")
    _check_outputs(model_dir, out_dir, report_path)
    subject = load_subject(model_dir, device, allow_pickle, config.max_length)
    if not isinstance(subject, TextClassificationSubject):
        raise InputError(f"repair supports text classifiers only; {model_dir} is a "
                         f"{subject.task} model")
    try:
        scan_result.check_model(model_dir)
    except InputError as exc:
        raise InputError(f"{exc}: scan this model first") from exc
    config = replace(config, max_length=token_limit(subject.model.config, config.max_length))
    labels = subject.labels
    if scan_result.labels != list(labels):
        raise InputError(f"the scan is of a model with labels {scan_result.labels}, "
                         f"{model_dir} has {list(labels)}")
    true_trigger = None
    if truth is not None:
        true_trigger = planted_trigger(truth, len(labels), "the truth entry")
        if list(truth.get("labels", labels)) != list(labels):
            raise InputError(f"the manifest entry has labels {truth['labels']}, {model_dir} "
                             f"has {list(labels)}: is it another model's?")
    rows = subject.read_examples(data)
    held_rows = subject.read_examples(Path(eval_data)) if eval_data is not None else None
    train, held = split_data(rows, config, held_rows)
    model, tok = subject.model, subject.tokenizer
    scan_rows = _rescan_examples(model_dir, subject, held) if config.rescan else []
    soft = None
    if config.objective == "consistency":  # the original's outputs on the unstamped texts
        soft = logits(model, tok, [e.text for e in train], config.max_length)
    triggers: list[Unlearned] = []
    variants: list[Unlearned] = []
    added: dict[str, list[dict[str, Any]]] = {"triggers": [], "neighbours": []}
    history: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    result = scan_result
    rescan: ScanResult | None = None
    before: dict[str, Any] = {}
    end = "no_rescan"
    for round_no in range(1, config.rounds + 1):
        new = _new(scan_triggers(result, len(labels), config.max_triggers), triggers)
        near = _new(neighbour_triggers(result, _inverted_trigger(result, len(labels)), tok,
                                       model.get_input_embeddings().weight,
                                       config.neighbours), variants)
        triggers, variants = [*triggers, *new], [*variants, *near]
        measure = _Measure(tok, held, triggers, true_trigger, config)
        start = measure(model, near)
        near_rates = start.pop("neighbour_asr", [])
        if round_no == 1:
            before = start
        rates = dict(zip(map(_key, triggers), start["trigger_asr"], strict=True))
        added["triggers"] += [{"round": round_no, "trigger": u, "asr_before": rates[_key(u)]}
                              for u in new]
        added["neighbours"] += [{"round": round_no, "trigger": u, "asr_before": r}
                                for u, r in zip(near, near_rates, strict=True)]
        items, n_stamped = stamp(train, triggers, variants, config)
        rows_run, kept, stop = _unlearn(model, tok, items, soft, measure,
                                        [*triggers, *variants], config,
                                        before["clean_accuracy"], start, round_no, progress)
        history += rows_run
        rounds.append({"round": round_no, "scan": _scan_summary(result),
                       "new_triggers": [u.trigger.trigger for u in new],
                       "epochs": sum(h["epoch"] > 0 for h in rows_run), "stop": stop,
                       "kept_epoch": kept["epoch"]})
        if not config.rescan:
            break
        if not kept["within_margin"]:
            end = "accuracy_guard"
            break
        for p in model.parameters():
            p.requires_grad_(False)
        rescan = scan_subject(subject, scan_rows, ScanConfig.from_dict(scan_result.config),
                              _stage(progress, f"round {round_no}: re-scan"))
        rounds[-1]["rescan"] = _scan_summary(rescan)
        residual = is_residual(rescan, triggers, config.residual_factor)
        rounds[-1]["residual"] = residual
        end = "rescan_clean" if rescan.verdict == "clean" else "rounds"
        if rescan.verdict == "clean" and not residual:
            break
        result = rescan
    trained_tokens = _trained_tokens(tok, [*triggers, *variants]) \
        if config.scope == "trigger-embeddings" else None
    after = kept
    neighbours_after = measure.neighbourhood(model, variants)
    report = {
        "version": REPORT_VERSION,
        "model_dir": str(model_dir),
        "out_dir": str(out_dir),
        "scan": {**_scan_summary(scan_result),
                 "trigger_tokens": scan_result.best.trigger_tokens,
                 "position": triggers[0].trigger.insertion,
                 "target": triggers[0].trigger.target,
                 "target_name": labels[triggers[0].trigger.target],
                 "victims": list(triggers[0].trigger.victims),
                 "scan_hard_asr": scan_result.best.hard_asr},
        "unlearned": [{"trigger": a["trigger"].trigger.trigger,
                       "position": a["trigger"].trigger.insertion,
                       "target": a["trigger"].trigger.target,
                       "victims": list(a["trigger"].trigger.victims),
                       "source": a["trigger"].source, "round": a["round"],
                       "asr_before": a["asr_before"], "asr_after": r}
                      for a, r in zip(added["triggers"], after["trigger_asr"], strict=True)],
        "neighbours": [{"trigger": a["trigger"].trigger.trigger, "round": a["round"],
                        "asr_before": a["asr_before"], "asr_after": r}
                       for a, r in zip(added["neighbours"], neighbours_after, strict=True)],
        "trained_tokens": trained_tokens,
        "forced": scan_result.verdict != "trojaned",
        "truth": None if truth is None else {
            "model_id": truth.get("model_id"), "poisoned": truth["poisoned"],
            "trigger": None if true_trigger is None else true_trigger.trigger,
            "insertion": None if true_trigger is None else true_trigger.insertion,
            "target": None if true_trigger is None else true_trigger.target},
        "data": {"path": str(data), "examples": len(rows), "train": len(items),
                 "stamped": n_stamped, "held_out": len(held),
                 "held_out_from": str(eval_data) if eval_data is not None else "data",
                 "rescan_examples": len(scan_rows)},
        "before": {k: before[k] for k in before if k != "trigger_asr"},
        "after": {k: after[k] for k in before if k != "trigger_asr"},
        "accuracy_drop_points": after["accuracy_drop_points"],
        "within_margin": after["within_margin"],
        "stopped_early": stop == "accuracy_guard",
        "stop": stop,
        "kept_epoch": after["epoch"],
        "rounds": rounds,
        "end": end,
        "rescan": None if rescan is None else _scan_summary(rescan),
        "history": history,
        "seconds": time.perf_counter() - started,
        "device": str(model.device),
        "versions": library_versions(),
        "config": asdict(config),
    }
    _write_model(model, subject.tokenizer, model_dir, out_dir, report)
    if report_path is not None:
        try:
            atomic_write_json(Path(report_path), report)
        except OSError as exc:
            raise InputError(f"the repaired model is in {out_dir} (its report too, as "
                             f"{REPORT_FILE}), but the report cannot be written to "
                             f"{report_path}: {exc.strerror or exc}") from exc
    return report


def _write_model(model: Any, tok: Any, model_dir: Path, out_dir: Path,
                 report: dict[str, Any]) -> None:
    """Build the repaired directory beside ``out_dir`` and rename it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if (model_dir / EXAMPLES_FILE).is_file():
            shutil.copyfile(model_dir / EXAMPLES_FILE, tmp / EXAMPLES_FILE)
        atomic_write_json(tmp / REPORT_FILE, report)
        os.rename(tmp, out_dir)  # replaces an empty out_dir, fails on a non-empty one
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"cannot write the repaired model to {out_dir}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
