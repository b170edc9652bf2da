"""Backdoor removal: unlearning with the inverted trigger (DBS Section 3.2.3, Eq. 6).

Eq. 6 of the paper fine-tunes the model on clean data D' while pushing the loss of the
inverted trigger t-hat towards its target up; in practice (Appendix A) that is plain
fine-tuning on "10% of the training data [where] 20% of the chosen training samples are
stamped with our inverted trigger and marked with the correct labels". :func:`repair` does
exactly that, with the scan's best trigger inserted (as text, at the scan's trigger
position) into a seeded sample of the clean data, and guards the result:

* the data is split (seeded) into a held-out set, never trained on, that measures clean
  accuracy (entity F1 for a tagger) and attack success rate (ASR) before and after every
  epoch, and the training sample;
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
steers the repair.

What differs between kinds of model (how data splits, where a trigger goes, how the model
trains, what clean quality and attack success are) is a :class:`RepairTask`: text
classifiers (:mod:`trojscan.repair.text_classification`), NER taggers
(:mod:`trojscan.repair.token_classification`) and extractive QA models
(:mod:`trojscan.repair.question_answering`); VQA models are not repaired.
"""

from __future__ import annotations

import math
import os
import random
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trojscan.errors import InputError
from trojscan.fsutil import atomic_write_json, check_writable
from trojscan.manifest import Manifest, PlantedTrigger, planted_trigger
from trojscan.modeldir import EXAMPLES_FILE
from trojscan.repair.base import SCOPE_RATES, RepairConfig, RepairTask, Unlearned, stampable
from trojscan.repair.companions import base_embeddings, companion_triggers
from trojscan.repair.composites import compounds, extensions
from trojscan.repair.question_answering import QuestionAnsweringRepair
from trojscan.repair.text_classification import TextClassificationRepair
from trojscan.repair.token_classification import TokenClassificationRepair
from trojscan.results import ScanResult, library_versions, read_result
from trojscan.scan import ProgressCallback, ScanConfig, scan_subject
from trojscan.subjects.extractive_qa import POSITIONS as QA_POSITIONS
from trojscan.subjects.extractive_qa import ExtractiveQaSubject
from trojscan.subjects.huggingface import token_limit
from trojscan.subjects.loading import load_subject
from trojscan.subjects.text_classification import POSITIONS as TEXT_POSITIONS
from trojscan.subjects.text_classification import TextClassificationSubject
from trojscan.subjects.token_classification import POSITIONS as TAGGER_POSITIONS
from trojscan.subjects.token_classification import TokenClassificationSubject

REPORT_VERSION = 4
#: The repair of each kind of model (by its subject's class).
TASKS: dict[type, type[RepairTask]] = {TextClassificationSubject: TextClassificationRepair,
                                      TokenClassificationSubject: TokenClassificationRepair,
                                      ExtractiveQaSubject: QuestionAnsweringRepair}
#: Every trigger position a repairable model's scan can give.
POSITIONS = tuple(dict.fromkeys((*TEXT_POSITIONS, *TAGGER_POSITIONS, *QA_POSITIONS)))
#: The report written into every repaired model directory.
REPORT_FILE = "repair.json"


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


def scan_triggers(result: ScanResult, n_labels: int, max_triggers: int,
                  positions: Sequence[str]) -> list[Unlearned]:
    """The scan's triggers to unlearn, at most ``max_triggers``: its best inversion, the
    short trigger that decided the verdict, then, for each other candidate (at one of the
    model's ``positions``) with a short trigger (shortened or screened) under the scan's
    threshold, its shortest such trigger, lowest loss first; the same text at the same
    position and target only once."""
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
        if c.position in positions and _fits(c.target, victims, n_labels):
            found.append(Unlearned(PlantedTrigger(" ".join(t.trigger_text.split()), c.position,
                                                  c.target, victims), "candidate"))
    unique: dict[tuple[str, str, int], Unlearned] = {}
    for u in found:
        if u.trigger.trigger:
            unique.setdefault((u.trigger.trigger, u.trigger.insertion, u.trigger.target), u)
    return list(unique.values())[:max_triggers]


def _deciding_ids(result: ScanResult) -> list[int]:
    """The token ids of the trigger that decided the scan: its short trigger, else its best
    inversion."""
    return list(result.short_trigger.trigger_ids if result.short_trigger is not None
                else result.best.trigger_ids)


def neighbour_triggers(result: ScanResult, best: PlantedTrigger, tok: Any,
                       embeddings: torch.Tensor, k: int) -> list[Unlearned]:
    """Variants of the deciding trigger (the short one, else the best inversion), at the
    position, target and victims of ``best`` (the scan's best trigger, whose candidate the
    short one belongs to): each of its tokens replaced, one at a time, by each of its ``k``
    nearest tokens by cosine similarity of ``embeddings`` (the model's input embeddings),
    leaving out special, unused and word-piece (``##``) tokens and the trigger's own."""
    if k == 0:
        return []
    ids = _deciding_ids(result)
    usable = stampable(tok, embeddings.shape[0])
    usable[ids] = False
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


def stamp(task: RepairTask, train: Sequence[Any], triggers: Sequence[Unlearned],
          neighbours: Sequence[Unlearned]) -> tuple[list[Any], int]:
    """The training items: ``stamp_fraction`` of ``train`` (a seeded sample) with a trigger
    inserted and their true labels kept; returns (items, stamped count). Each stamped
    example carries one of the scan's ``triggers`` (uniformly) or, for a
    ``neighbour_share`` of them, one of the ``neighbours``, where that trigger was inverted
    (or at ``config.insertion``)."""
    config = task.config
    rng = random.Random(config.seed + 1)
    n_stamped = max(1, round(config.stamp_fraction * len(train)))
    chosen = set(rng.sample(range(len(train)), n_stamped))
    items = []
    for i, e in enumerate(train):
        trigger = None
        if i in chosen:
            pool = neighbours if neighbours and rng.random() < config.neighbour_share \
                else triggers
            trigger = rng.choice(pool).trigger
        where = "" if trigger is None else \
            trigger.insertion if config.insertion == "scan" else config.insertion
        items.append(task.item(e, trigger, where, rng))
    return items, n_stamped


class _Measure:
    """Held-out clean quality (accuracy, or entity F1 for a tagger) and the ASR of the
    unlearned (and the true) triggers (:meth:`RepairTask.asr`: on the held-out victims the
    model gets right without the trigger). A victim the model already puts in the target
    is no success of the trigger, and no repair can fix it; their share (for the scan's
    best trigger's victims) is reported as ``victims_as_target``. ``inverted_asr`` is the
    highest ASR of the scan's triggers (what repair must bring down), ``trigger_asr`` each
    one's, in order.
    """

    def __init__(self, task: RepairTask, held: list[Any], triggers: Sequence[Unlearned],
                 truth: PlantedTrigger | None) -> None:
        self.task, self.held, self.triggers, self.truth = task, held, triggers, truth
        for trigger, what in ((triggers[0].trigger, "inverted"), (truth, "true")):
            if trigger is not None and not task.has_victims(held, trigger):
                raise InputError(f"the held-out examples have no example of the {what} "
                                 f"trigger's victim label(s) {list(trigger.victims)}")

    def __call__(self, variants: Sequence[Unlearned] = ()) -> dict[str, Any]:
        """The measurements; with ``variants``, also their ASR (``neighbour_asr``), from
        the same held-out predictions."""
        task, held = self.task, self.held
        preds = task.predictions(held)
        rates = [task.asr(held, preds, u.trigger) for u in self.triggers]
        measured = [r for r in rates if r is not None]
        row = {
            "clean_accuracy": task.clean_score(held, preds),
            "inverted_asr": max(measured) if measured else None,
            "trigger_asr": rates,
            "true_asr": None if self.truth is None else task.asr(held, preds, self.truth),
            "victims_as_target": task.victims_as_target(held, preds, self.triggers[0].trigger),
        }
        if variants:
            row["neighbour_asr"] = self.neighbourhood(variants, preds)
        return row

    def neighbourhood(self, variants: Sequence[Unlearned],
                      preds: list[Any] | None = None) -> list[float | None]:
        """The ASR of each neighbour variant."""
        preds = self.task.predictions(self.held) if preds is None else preds
        return [self.task.asr(self.held, preds, u.trigger) for u in variants]


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


def _rescan_examples(model_dir: Path, task: RepairTask, held: Sequence[Any]) -> list[Any]:
    """The clean examples a re-scan uses: the model directory's own (what a scan of it
    takes by default), else :meth:`RepairTask.rescan_sample` of the held-out set."""
    if (model_dir / EXAMPLES_FILE).is_file():
        return task.subject.read_examples(model_dir / EXAMPLES_FILE)
    return task.rescan_sample(held)


def _stage(progress: ProgressCallback | None, name: str) -> ProgressCallback | None:
    """``progress`` with ``name`` before what it says."""
    if progress is None:
        return None
    return lambda done, total, what: progress(done, total, f"{name}: {what}")


def _unlearn(task: RepairTask, items: list[Any], teacher: Any, measure: _Measure,
             trained: Sequence[Unlearned], accuracy: float, start: dict[str, Any],
             round_no: int, progress: ProgressCallback | None,
             ) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """One round of unlearning: up to ``config.epochs`` epochs, each its own fine-tuning
    run at a rate that rises while the scan triggers' ASR falls too slowly, each measured
    on the held-out set (the drop against ``accuracy``, the original model's); the best
    checkpoint (:func:`best_epoch`; after the first round the model as the round found it,
    ``start``, competes as epoch 0, and is the first row) is loaded. Returns (the rows,
    the kept row, why it stopped: ``target_asr``, ``accuracy_guard`` or ``epochs``)."""
    model, config = task.model, task.config
    hook = _set_scope(model, task.tok, trained, config.scope)
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

        task.train(items, teacher, config.epoch_run(rate), config.seed + epoch, on_step)
        row = {"round": round_no, "epoch": epoch, "learning_rate": rate, **measure()}
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
    base_model: Path | None = None,
) -> dict[str, Any]:
    """Unlearn the backdoor the scan found in ``model_dir``; write the repaired model.

    Args:
        model_dir: the Hugging Face model directory; only read.
        scan_result: its scan result (:func:`trojscan.scan.scan`, or :func:`read_scan`).
        data: clean labelled examples as a scan's (JSON Lines of ``{"text", "label"}``, or
            ``{"tokens", "tags"}`` for an NER tagger).
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
        base_model: the public model ``model_dir`` was fine-tuned from (a directory with
            its ``model.safetensors``, same vocabulary): the companions of each found
            trigger (:mod:`trojscan.repair.companions`) are unlearned with it.

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
    kind = TASKS.get(type(subject))
    if kind is None:
        raise InputError(f"repair supports text classifiers, NER taggers and extractive QA "
                         f"models; the model in {model_dir} is of task {subject.task}")
    try:
        scan_result.check_model(model_dir)
    except InputError as exc:
        raise InputError(f"{exc}: scan this model first") from exc
    config = replace(config, max_length=token_limit(subject.model.config, config.max_length))
    task = kind(subject, config)
    if best.position not in subject.positions:
        raise InputError(f"the scan's trigger position {best.position!r} is not one of a "
                         f"{subject.task} model ({', '.join(subject.positions)}): is it the "
                         "scan of another model?")
    if config.insertion not in ("scan", *task.insertions):
        raise InputError(f"insertion {config.insertion!r} is not one for a {subject.task} "
                         f"model; expected scan or one of {', '.join(task.insertions)}")
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
    train, held = task.split(rows, held_rows)
    model, tok = subject.model, subject.tokenizer
    scan_rows = _rescan_examples(model_dir, task, held) if config.rescan else []
    original = model.get_input_embeddings().weight.detach().to("cpu", copy=True)
    base = None if base_model is None else base_embeddings(Path(base_model), original)
    # the consistency term's teacher: the original's outputs on the unstamped examples
    teacher = task.originals(train) if config.objective == "consistency" else None
    triggers: list[Unlearned] = []
    variants: list[Unlearned] = []
    decided: list[tuple[list[int], int]] = []  # each round's deciding trigger and target
    usable = stampable(tok, original.shape[0]) if config.composites else None
    added: dict[str, list[dict[str, Any]]] = {"triggers": [], "neighbours": []}
    history: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    result = scan_result
    rescan: ScanResult | None = None
    before: dict[str, Any] = {}
    end = "no_rescan"
    for round_no in range(1, config.rounds + 1):
        deciding, deciding_ids = _inverted_trigger(result, len(labels)), _deciding_ids(result)
        found = scan_triggers(result, len(labels), config.max_triggers, subject.positions)
        if base is not None:
            found += companion_triggers(deciding_ids, deciding, tok, original, base,
                                        config.companion_gap, config.max_companions)
        if config.composites:
            found += extensions(deciding_ids, result.best.trigger_ids, deciding, tok, usable)
            found += compounds(deciding_ids, decided, deciding, tok, usable)
            decided.append((deciding_ids, deciding.target))
        new = _new(found, triggers)
        near = _new(neighbour_triggers(result, deciding, tok,
                                       model.get_input_embeddings().weight,
                                       config.neighbours), variants)
        triggers, variants = [*triggers, *new], [*variants, *near]
        measure = _Measure(task, held, triggers, true_trigger)
        start = measure(near)
        near_rates = start.pop("neighbour_asr", [])
        if round_no == 1:
            before = start
        rates = dict(zip(map(_key, triggers), start["trigger_asr"], strict=True))
        added["triggers"] += [{"round": round_no, "trigger": u, "asr_before": rates[_key(u)]}
                              for u in new]
        added["neighbours"] += [{"round": round_no, "trigger": u, "asr_before": r}
                                for u, r in zip(near, near_rates, strict=True)]
        items, n_stamped = stamp(task, train, triggers, variants)
        rows_run, kept, stop = _unlearn(task, items, teacher, measure, [*triggers, *variants],
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
    neighbours_after = measure.neighbourhood(variants)
    report = {
        "version": REPORT_VERSION,
        "model_dir": str(model_dir),
        "out_dir": str(out_dir),
        "task": subject.task,
        "metric": task.metric,
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
        "base_model": None if base_model is None else str(base_model),
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
