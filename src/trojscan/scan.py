"""The scan: invert a trigger for every candidate target, decide from the lowest loss.

Candidates (DBS Section 3.2): every label as target with the other labels' examples as
victims (universal); with ``pairs``, every ordered (victim, target) pair (label-specific);
each at every trigger position asked for. When there are more labels than
``preselect_above``, every candidate first gets a short pre-run of ``prerun_epochs`` and
only the ``top_k`` with the lowest loss get the full run (the K-Arm strategy DBS uses for
NER, Appendix A). The verdict is Eq. 4: trojaned when the lowest inversion loss is under
the threshold beta.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from trojscan.errors import InputError
from trojscan.inversion.base import Inversion
from trojscan.inversion.dbs import DBSConfig, invert
from trojscan.subjects.loading import load_examples, load_subject
from trojscan.subjects.text import POSITIONS, TextSubject

RESULT_VERSION = 1
#: Default beta of Eq. 4 (see README "Scan": where it comes from).
DEFAULT_THRESHOLD = 0.05

#: Called as (candidates done, candidates in all, what is running now).
ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ScanConfig:
    """How a model is scanned.

    Attributes:
        dbs: the inverter's settings (Algorithm 1).
        positions: trigger positions tried for every candidate.
        pairs: also try every label-specific (victim, target) pair.
        preselect_above: with more labels than this, pre-run all candidates and fully
            invert the ``top_k`` only.
        prerun_epochs: epochs of the pre-run.
        top_k: candidates kept for the full run.
        threshold: beta of Eq. 4.
        max_length: tokens per example, trigger included.
    """

    dbs: DBSConfig = field(default_factory=DBSConfig)
    positions: tuple[str, ...] = ("start",)
    pairs: bool = False
    preselect_above: int = 2
    prerun_epochs: int = 20
    top_k: int = 2
    threshold: float = DEFAULT_THRESHOLD
    max_length: int = 100

    def __post_init__(self) -> None:
        unknown = [p for p in self.positions if p not in POSITIONS]
        if unknown or not self.positions:
            raise InputError(f"unknown trigger position {unknown[0] if unknown else '(none)'}; "
                             f"expected some of {', '.join(POSITIONS)}")
        if self.top_k < 1 or self.prerun_epochs < 1:
            raise InputError("top_k and prerun_epochs must be >= 1")


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


def _invert(subject: TextSubject, examples: list[dict[str, Any]], candidate: Candidate,
            config: DBSConfig) -> Inversion:
    chosen = [e for e in examples if e["label"] in candidate.victims]
    return invert(subject, [e["text"] for e in chosen], [e["label"] for e in chosen],
                  candidate.target, candidate.position, config)


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
    prerun: dict[Candidate, float] = {}
    if len(labels) > config.preselect_above and len(todo) > config.top_k:
        short = replace(config.dbs, epochs=config.prerun_epochs)
        for i, cand in enumerate(todo):
            if progress:
                progress(i, len(todo) + config.top_k, f"pre-run target {labels[cand.target]}")
            prerun[cand] = _invert(subject, examples, cand, short).relaxed_loss
        todo = sorted(todo, key=prerun.__getitem__)[: config.top_k]
    offset = len(prerun)
    results = []
    for i, cand in enumerate(todo):
        if progress:
            progress(offset + i, offset + len(todo), f"target {labels[cand.target]} "
                     f"@{cand.position}")
        results.append((cand, _invert(subject, examples, cand, config.dbs)))
    if progress:
        progress(offset + len(todo), offset + len(todo), "done")
    best_cand, best = min(results, key=lambda r: r[1].relaxed_loss)
    rows = [{"target": c.target, "target_name": labels[c.target], "victims": list(c.victims),
             "position": c.position, "relaxed_loss": inv.relaxed_loss,
             "hard_loss": inv.hard_loss, "hard_asr": inv.hard_asr, "accepted": inv.accepted,
             "trigger_text": inv.trigger_text, "seconds": inv.seconds}
            for c, inv in results]
    rows += [{"target": c.target, "target_name": labels[c.target], "victims": list(c.victims),
              "position": c.position, "prerun_loss": loss, "full_run": False}
             for c, loss in prerun.items() if c not in todo]
    score = best.relaxed_loss
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


def write_result(result: dict[str, Any], path: Path) -> None:
    """Write a scan result atomically."""
    from trojscan.fsutil import atomic_write_text

    atomic_write_text(Path(path), json.dumps(result, indent=2) + "\n")
