"""The scan: invert a trigger for every candidate of a subject, decide from the lowest loss.

The candidates are the subject's (:meth:`~trojscan.subjects.base.Subject.candidates`; for a
classifier, DBS Section 3.2: every label as target with the other labels' examples as
victims, and with ``pairs`` every (victim, target) pair), each at every trigger position
asked for. When there are more labels than ``preselect_above`` and the inverter is batched
(DBS and its variants), every candidate first gets a pre-run of ``prerun_epochs`` and only
the ``top_k`` with the lowest loss so far (at most half of the candidates, rounded up) go on
to the full ``epochs`` (the K-Arm strategy DBS uses for NER, Appendix A). The candidates are
inverted together in one batched run, in which the pre-run is simply the first
``prerun_epochs`` epochs: the kept candidates carry on from where they are, the others leave
the batch. With ``batch_candidates`` (groups of candidates, for memory) the pre-run is a
separate run and the kept candidates restart. A one-by-one inverter (the baselines) inverts
every candidate with its full budget. The verdict is Eq. 4: trojaned when the lowest
inversion loss is under the threshold beta.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from trojscan.errors import InputError
from trojscan.inversion.base import (
    Inversion,
    InversionTask,
    Inverter,
    Preselection,
    make_config,
    method_of,
)
from trojscan.inversion.dbs import DBSConfig
from trojscan.modeldir import weights_sha256
from trojscan.results import (
    BestTrigger,
    CandidateResult,
    ModelRef,
    ScanResult,
    library_versions,
)
from trojscan.subjects.base import Candidate, Subject, subject_classes
from trojscan.subjects.loading import load_subject

#: Default beta of Eq. 4 (see README "Scan": where it comes from).
DEFAULT_THRESHOLD = 0.05

#: Called as (optimisation epochs done, epochs in all, what is running now).
ProgressCallback = Callable[[int, int, str], None]


def known_positions() -> tuple[str, ...]:
    """Every trigger position some registered model family takes."""
    return tuple(dict.fromkeys(p for cls in subject_classes() for p in cls.positions))


@dataclass(frozen=True)
class ScanConfig:
    """How a model is scanned.

    Attributes:
        method: the inverter, a method or variant name of the inverter registry
            (:func:`trojscan.inversion.base.method_names`).
        inverter: its settings (for DBS, Algorithm 1's); of the method's config class.
        positions: trigger positions tried for every candidate.
        pairs: also try every label-specific (victim, target) pair.
        preselect_above: with more labels than this, pre-run all candidates and fully
            invert the best ``top_k`` only; 1 (the default) pre-runs binary models too, so
            that the scan of a binary model fully inverts one target, not two. Batched
            inverters (DBS and its variants) only.
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
    inverter: Any = field(default_factory=DBSConfig)
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
        try:
            config_class = method_of(self.method).config_class
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        if not isinstance(self.inverter, config_class):
            raise InputError(f"method {self.method} needs a {config_class.__name__}, not a "
                             f"{type(self.inverter).__name__}")
        known = known_positions()
        unknown = [p for p in self.positions if p not in known]
        if unknown or not self.positions:
            raise InputError(f"unknown trigger position {unknown[0] if unknown else '(none)'}; "
                             f"expected some of {', '.join(known)}")
        if self.top_k < 1 or self.prerun_epochs < 1:
            raise InputError("top_k and prerun_epochs must be >= 1")
        if self.batch_candidates < 0 or self.max_victims < 0:
            raise InputError("batch_candidates and max_victims must be >= 0 (0 = all)")


def scan_config(method: str = "dbs", threshold: float | None = None,
                positions: Sequence[str] = ("start",), pairs: bool = False,
                epochs: int | None = None, trigger_length: int | None = None,
                max_victims: int = 20, seed: int = 0) -> ScanConfig:
    """The :class:`ScanConfig` of the options every entry point offers (None keeps the
    method's or the scan's default); a bad option is an :class:`InputError`."""
    try:
        inverter = make_config(method, trigger_length, epochs, seed)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    config = ScanConfig(method=method, inverter=inverter,
                        positions=tuple(p.strip() for p in positions), pairs=pairs,
                        max_victims=max_victims)
    return config if threshold is None else replace(config, threshold=threshold)


class _Stages:
    """Runs candidates in batched groups and reports progress in optimisation epochs."""

    def __init__(self, subject: Subject, examples: Sequence[Any], config: ScanConfig,
                 progress: ProgressCallback | None) -> None:
        self.subject, self.examples, self.config, self.progress = (subject, examples, config,
                                                                   progress)
        self.done, self.total = 0, 0

    def groups(self, n: int) -> list[slice]:
        size = self.config.batch_candidates or n
        return [slice(i, i + size) for i in range(0, n, size)]

    def plan(self, n: int, epochs: int) -> None:
        self.total += len(self.groups(n)) * epochs

    def run(self, todo: list[Candidate], inverter: Inverter, what: str,
            keep: int = 0) -> list[Inversion]:
        """Invert ``todo`` group by group; with ``keep`` (a batched inverter, one group
        only), keep the best ``keep`` after the pre-run epochs and carry on with them."""
        out: list[Inversion] = []
        for group in self.groups(len(todo)):
            cands = todo[group]
            label = f"{what}: {len(cands)} candidate{'s' if len(cands) > 1 else ''}"
            if keep:
                label += f", the best {keep} after epoch {self.config.prerun_epochs}"

            def on_epoch(epoch: int, label: str = label) -> None:
                if self.progress:
                    self.progress(self.done + epoch + 1, self.total, label)

            tasks = [InversionTask(c, tuple(self.subject.victims(self.examples, c,
                                                                 self.config.max_victims)))
                     for c in cands]
            preselect = Preselection(keep, self.config.prerun_epochs) if keep else None
            out += inverter.invert(self.subject, tasks, on_epoch, preselect)
            self.done += inverter.config.epochs
        return out


def scan_subject(subject: Subject, examples: Sequence[Any], config: ScanConfig | None = None,
                 progress: ProgressCallback | None = None) -> ScanResult:
    """Scan a loaded subject with its clean examples (as the subject reads them)."""
    config = config or ScanConfig()
    started = time.perf_counter()
    inverter = method_of(config.method)(config.inverter)
    if not inverter.supports(subject):
        raise InputError(f"method {config.method} cannot scan {subject.task} models")
    labels = subject.labels
    todo = subject.candidates(examples, config.positions, config.pairs)
    stages = _Stages(subject, examples, config, progress)
    keep = min(config.top_k, math.ceil(len(todo) / 2))
    preselect = inverter.batched and len(labels) > config.preselect_above and len(todo) > keep
    prerun: dict[Candidate, float] = {}
    if preselect and len(stages.groups(len(todo))) == 1:
        # One batched run: the pre-run's state carries on for the top k.
        stages.plan(1, inverter.config.epochs)
        runs = stages.run(todo, inverter, "inversion", keep=keep)
        prerun = {c: inv.relaxed_loss for c, inv in zip(todo, runs, strict=True)
                  if inv.trajectory[-1].get("event") == "drop"}
        results = [(c, inv) for c, inv in zip(todo, runs, strict=True) if c not in prerun]
    else:
        # Candidates run in several groups (``batch_candidates``): a separate pre-run, then
        # the top k from scratch.
        if preselect:
            stages.plan(len(todo), config.prerun_epochs)
        stages.plan(keep if preselect else len(todo), inverter.config.epochs)
        if preselect:
            short = type(inverter)(replace(inverter.config, epochs=config.prerun_epochs))
            runs = stages.run(todo, short, "pre-run")
            prerun = {c: inv.relaxed_loss for c, inv in zip(todo, runs, strict=True)}
            todo = sorted(todo, key=prerun.__getitem__)[:keep]
        results = list(zip(todo, stages.run(todo, inverter, "inversion"), strict=True))
    best_cand, best = min(results, key=lambda r: r[1].loss)
    rows = [CandidateResult(target=c.target, target_name=labels[c.target],
                            victims=list(c.victims), position=c.position, loss=inv.loss,
                            relaxed_loss=inv.relaxed_loss, hard_loss=inv.hard_loss,
                            hard_asr=inv.hard_asr, accepted=inv.accepted,
                            trigger_text=inv.trigger_text, seconds=inv.seconds)
            for c, inv in results]
    rows += [CandidateResult(target=c.target, target_name=labels[c.target],
                             victims=list(c.victims), position=c.position, prerun_loss=loss,
                             full_run=False)
             for c, loss in prerun.items() if c not in dict(results)]
    score = best.loss
    return ScanResult(
        verdict="trojaned" if score < config.threshold else "clean",
        score=score,
        threshold=config.threshold,
        best=BestTrigger(**best.summary(), target_name=labels[best_cand.target],
                         victim_names=[labels[v] for v in best_cand.victims]),
        candidates=rows,
        trajectory=best.trajectory,
        labels=list(labels),
        examples=len(examples),
        seconds=time.perf_counter() - started,
        device=str(subject.device),
        versions=library_versions(),
        config=asdict(config),
        task=subject.task,
    )


def trigger_check(subject: Subject, examples: Sequence[Any], candidate: Candidate,
                  trigger: str, cap: int = 0) -> tuple[float, float]:
    """Loss and attack success rate of a known ``trigger`` (text, as hard tokens) for
    ``candidate`` on its victims among ``examples`` (at most ``cap``, 0: all), measured as a
    scan measures its inverted triggers: the subject's goal loss, averaged over the victims."""
    ids = subject.token_ids(trigger)
    if not ids:
        raise InputError(f"the trigger {trigger!r} has no tokens")
    victims = subject.victims(examples, candidate, cap)
    if not victims:
        raise InputError(f"no example of the victim label(s) {list(candidate.victims)}")
    batch = subject.batch([candidate], [victims], len(ids))
    with torch.no_grad():
        loss, hit = subject.hard_check(batch, torch.tensor(ids, device=subject.device))
    return loss.mean().item(), hit.mean().item()


def scan(model_dir: Path, examples: Path, config: ScanConfig | None = None,
         device: str = "cpu", allow_pickle: bool = False,
         progress: ProgressCallback | None = None) -> ScanResult:
    """Scan the model in ``model_dir`` with the clean examples in the file ``examples``.

    The result names the model (its directory and the SHA-256 of its weights). Raises
    :class:`InputError` for bad input.
    """
    config = config or ScanConfig()
    model_dir = Path(model_dir)
    subject = load_subject(model_dir, device, allow_pickle, config.max_length)
    model = ModelRef(str(model_dir), weights_sha256(model_dir))
    rows = subject.read_examples(Path(examples))
    result = scan_subject(subject, rows, config, progress)
    result.model = model
    return result
