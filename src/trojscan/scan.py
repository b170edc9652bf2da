"""The scan: invert a trigger for every candidate target, decide from the lowest loss.

Candidates (DBS Section 3.2): every label as target with the other labels' examples as
victims (universal); with ``pairs``, every ordered (victim, target) pair (label-specific);
each at every trigger position asked for. When there are more labels than
``preselect_above``, every candidate first gets a pre-run of ``prerun_epochs`` and only the
``top_k`` with the lowest loss so far (at most half of the candidates, rounded up) go on to
the full ``epochs`` (the K-Arm strategy DBS uses for NER, Appendix A). The candidates are
inverted together in one batched run (:func:`trojscan.inversion.dbs.invert_many`), in which
the pre-run is simply the first ``prerun_epochs`` epochs: the kept candidates carry on from
where they are, the others leave the batch. With ``batch_candidates`` (groups of
candidates, for memory) the pre-run is a separate run and the kept candidates restart. The
verdict is Eq. 4: trojaned when the lowest inversion loss is under the threshold beta.

``method`` picks the inverter (:mod:`trojscan.inversion.methods`): DBS, one of its
ablations, or a baseline (UAT, ASCC, genetic search, T-Miner). The pre-run and the batching
are DBS's; a baseline inverts every candidate, one after another, with its full budget.
"""

from __future__ import annotations

import itertools
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trojscan.errors import InputError
from trojscan.inversion.base import Inversion
from trojscan.inversion.dbs import DBSConfig, InversionTask, invert_many
from trojscan.inversion.methods import METHODS, InverterConfig
from trojscan.subjects.loading import load_examples, load_subject
from trojscan.subjects.text import POSITIONS, TextSubject

if TYPE_CHECKING:
    from trojscan.campaign.detect import Detector

RESULT_VERSION = 1
#: Default beta of Eq. 4 (see README "Scan": where it comes from).
DEFAULT_THRESHOLD = 0.05

#: Called as (optimisation epochs done, epochs in all, what is running now).
ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ScanConfig:
    """How a model is scanned.

    Attributes:
        method: the inverter, a name of :data:`trojscan.inversion.methods.METHODS`.
        inverter: its settings (for DBS, Algorithm 1's); of the method's config class.
        positions: trigger positions tried for every candidate.
        pairs: also try every label-specific (victim, target) pair.
        preselect_above: with more labels than this, pre-run all candidates and fully
            invert the best ``top_k`` only; 1 (the default) pre-runs binary models too, so
            that the scan of a binary model fully inverts one target, not two. DBS and its
            ablations only.
        prerun_epochs: epochs of the pre-run. At 20 a tiny test model's true target ranked
            second; at 40 it, and every MiniLM model of the README's zoo, ranks first.
        top_k: candidates kept for the full run (at most half of them, rounded up).
        threshold: beta of Eq. 4.
        max_length: tokens per example, trigger included.
        batch_candidates: candidates inverted together in one batched run (their rows share
            every forward pass); 0 puts all candidates of a stage in one run, 1 inverts them
            one by one as the paper's code does. Lower it when memory is short.
        max_victims: victim examples per candidate, 0 for all. A candidate's cost grows with
            its rows, and with many labels its victims are all the other labels' examples
            (80 for BBC's 5 labels at 20 per label); past the cap it takes an even share of
            each victim label's examples, in file order. The default leaves a binary model
            with 20 examples per label untouched.
    """

    method: str = "dbs"
    inverter: InverterConfig = field(default_factory=DBSConfig)
    positions: tuple[str, ...] = ("start",)
    pairs: bool = False
    preselect_above: int = 1
    prerun_epochs: int = 40
    top_k: int = 2
    threshold: float = DEFAULT_THRESHOLD
    max_length: int = 100
    batch_candidates: int = 0
    max_victims: int = 20

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; expected one of "
                             f"{', '.join(METHODS)}")
        if not isinstance(self.inverter, METHODS[self.method][0]):
            raise InputError(f"method {self.method} needs a "
                             f"{METHODS[self.method][0].__name__}, not a "
                             f"{type(self.inverter).__name__}")
        unknown = [p for p in self.positions if p not in POSITIONS]
        if unknown or not self.positions:
            raise InputError(f"unknown trigger position {unknown[0] if unknown else '(none)'}; "
                             f"expected some of {', '.join(POSITIONS)}")
        if self.top_k < 1 or self.prerun_epochs < 1:
            raise InputError("top_k and prerun_epochs must be >= 1")
        if self.batch_candidates < 0 or self.max_victims < 0:
            raise InputError("batch_candidates and max_victims must be >= 0 (0 = all)")


@dataclass(frozen=True)
class Candidate:
    """Victim labels -> target label, with the trigger at ``position``."""

    victims: tuple[int, ...]
    target: int
    position: str


def candidates(n_labels: int, present: set[int], config: ScanConfig) -> list[Candidate]:
    """Every candidate the scan considers, given the labels that have examples."""
    out = []
    for target in range(n_labels):
        victims = tuple(sorted(present - {target}))
        groups = [victims] if victims else []
        if config.pairs and len(victims) > 1:
            groups += [(v,) for v in victims]
        out += [Candidate(g, target, p) for g in groups for p in config.positions]
    return out


def victim_examples(examples: list[dict[str, Any]], victims: tuple[int, ...],
                    cap: int) -> list[dict[str, Any]]:
    """The examples a candidate inverts on: those of the ``victims`` labels, at most
    ``cap`` (0: all), taken in turn from each victim label in file order."""
    per_label = [[e for e in examples if e["label"] == v] for v in victims]
    turns = [e for row in itertools.zip_longest(*per_label) for e in row if e is not None]
    return turns[:cap] if cap else turns


def _task(examples: list[dict[str, Any]], candidate: Candidate, cap: int) -> InversionTask:
    chosen = victim_examples(examples, candidate.victims, cap)
    return InversionTask([e["text"] for e in chosen], [e["label"] for e in chosen],
                         candidate.target, candidate.position)


class _Stages:
    """Runs candidates in batched groups and reports progress in optimisation epochs."""

    def __init__(self, subject: TextSubject, examples: list[dict[str, Any]],
                 config: ScanConfig, progress: ProgressCallback | None) -> None:
        self.subject, self.examples, self.config, self.progress = (subject, examples, config,
                                                                   progress)
        self.done, self.total = 0, 0

    def groups(self, n: int) -> list[slice]:
        size = self.config.batch_candidates or n
        return [slice(i, i + size) for i in range(0, n, size)]

    def plan(self, n: int, epochs: int) -> None:
        self.total += len(self.groups(n)) * epochs

    def run(self, todo: list[Candidate], inverter: InverterConfig, what: str,
            keep: int = 0) -> list[Inversion]:
        """Invert ``todo`` group by group; with ``keep`` (DBS, one group only), keep the best
        ``keep`` after the pre-run epochs and carry on with them."""
        out: list[Inversion] = []
        for group in self.groups(len(todo)):
            cands = todo[group]
            label = f"{what}: {len(cands)} candidate{'s' if len(cands) > 1 else ''}"
            if keep:
                label += f", the best {keep} after epoch {self.config.prerun_epochs}"

            def on_epoch(epoch: int, label: str = label) -> None:
                if self.progress:
                    self.progress(self.done + epoch + 1, self.total, label)

            tasks = [_task(self.examples, c, self.config.max_victims) for c in cands]
            if isinstance(inverter, DBSConfig):
                out += invert_many(self.subject, tasks, inverter, on_epoch, keep,
                                   self.config.prerun_epochs)
            else:
                out += METHODS[self.config.method][1](self.subject, tasks, inverter, on_epoch)
            self.done += inverter.epochs
        return out


def scan_subject(subject: TextSubject, examples: list[dict[str, Any]],
                 config: ScanConfig | None = None,
                 progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Scan a loaded subject with its clean examples; returns the result record."""
    config = config or ScanConfig()
    started = time.perf_counter()
    labels = subject.labels
    present = {e["label"] for e in examples}
    missing = [f"{i}={name}" for i, name in enumerate(labels) if i not in present]
    if missing:
        raise InputError(f"no clean example of label {', '.join(missing)}: every label is the "
                         "victim of some candidate target, so each needs examples")
    todo = candidates(len(labels), present, config)
    stages = _Stages(subject, examples, config, progress)
    keep = min(config.top_k, math.ceil(len(todo) / 2))
    preselect = (isinstance(config.inverter, DBSConfig)
                 and len(labels) > config.preselect_above and len(todo) > keep)
    prerun: dict[Candidate, float] = {}
    if preselect and len(stages.groups(len(todo))) == 1:
        # One batched run: the pre-run's state carries on for the top k.
        stages.plan(1, config.inverter.epochs)
        runs = stages.run(todo, config.inverter, "inversion", keep=keep)
        prerun = {c: inv.relaxed_loss for c, inv in zip(todo, runs, strict=True)
                  if inv.trajectory[-1].get("event") == "drop"}
        results = [(c, inv) for c, inv in zip(todo, runs, strict=True) if c not in prerun]
    else:
        # Candidates run in several groups (``batch_candidates``): a separate pre-run, then
        # the top k from scratch.
        if preselect:
            stages.plan(len(todo), config.prerun_epochs)
        stages.plan(keep if preselect else len(todo), config.inverter.epochs)
        if preselect:
            short = replace(config.inverter, epochs=config.prerun_epochs)
            runs = stages.run(todo, short, "pre-run")
            prerun = {c: inv.relaxed_loss for c, inv in zip(todo, runs, strict=True)}
            todo = sorted(todo, key=prerun.__getitem__)[:keep]
        results = list(zip(todo, stages.run(todo, config.inverter, "inversion"),
                           strict=True))
    best_cand, best = min(results, key=lambda r: r[1].loss)
    rows = [{"target": c.target, "target_name": labels[c.target], "victims": list(c.victims),
             "position": c.position, "loss": inv.loss, "relaxed_loss": inv.relaxed_loss,
             "hard_loss": inv.hard_loss, "hard_asr": inv.hard_asr, "accepted": inv.accepted,
             "trigger_text": inv.trigger_text, "seconds": inv.seconds}
            for c, inv in results]
    rows += [{"target": c.target, "target_name": labels[c.target], "victims": list(c.victims),
              "position": c.position, "prerun_loss": loss, "full_run": False}
             for c, loss in prerun.items() if c not in dict(results)]
    score = best.loss
    return {
        "version": RESULT_VERSION,
        "verdict": "trojaned" if score < config.threshold else "clean",
        "score": score,
        "threshold": config.threshold,
        "best": {**{k: v for k, v in best.to_dict().items() if k != "trajectory"},
                 "target_name": labels[best_cand.target],
                 "victim_names": [labels[v] for v in best_cand.victims]},
        "candidates": rows,
        "trajectory": best.trajectory,
        "labels": list(labels),
        "examples": len(examples),
        "seconds": time.perf_counter() - started,
        "device": str(subject.device),
        "versions": _versions(),
        "config": asdict(config),
    }


def _versions() -> dict[str, str]:
    import transformers

    from trojscan import __version__

    return {"trojscan": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def scan(model_dir: Path, examples: Path, config: ScanConfig | None = None,
         device: str = "cpu", allow_pickle: bool = False,
         progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Scan the model in ``model_dir`` with the clean examples of the ``examples`` JSONL file.

    Returns the result record (see README "Scan"); raises :class:`InputError` for bad input.
    """
    config = config or ScanConfig()
    subject = load_subject(Path(model_dir), device, allow_pickle, config.max_length)
    rows = load_examples(Path(examples), subject.labels)
    return scan_subject(subject, rows, config, progress)


def apply_detector(result: dict[str, Any], detector: Detector, source: Path | None = None) -> None:
    """Decide ``result`` with a fitted campaign detector instead of the threshold: records
    its probability of "trojaned" and sets the verdict to trojaned when it is >= 0.5."""
    probability = float(detector.predict_proba([result])[0, 1])
    result["detector"] = {"kind": detector.kind, "probability": probability,
                          "path": None if source is None else str(source)}
    result["verdict"] = "trojaned" if probability >= 0.5 else "clean"


def write_result(result: dict[str, Any], path: Path) -> None:
    """Write a scan result atomically."""
    from trojscan.fsutil import atomic_write_text

    atomic_write_text(Path(path), json.dumps(result, indent=2) + "\n")
