"""The scan: invert a trigger for every candidate of a subject, decide from the lowest loss.

The candidates are the subject's (:meth:`~trojscan.subjects.base.Subject.candidates`; for a
classifier, DBS Section 3.2: every label as target with the other labels' examples as
victims, and with ``pairs`` every (victim, target) pair), each at every trigger position
asked for; when that is all the family's positions, the candidates ``spread`` names are
searched once over victim rows spread across the positions, and the trigger found is then
measured at each position (:meth:`_Stages.resolve`). When there are more labels than
``preselect_above`` and the inverter is batched (DBS and its variants), every candidate
first gets a pre-run of ``prerun_epochs`` and only the ``top_k`` with the lowest loss so
far (at most half of the candidates, rounded up) go on to the full ``epochs`` (the K-Arm
strategy DBS uses for NER, Appendix A). The candidates are inverted together in one batched
run, in which the pre-run is simply the first ``prerun_epochs`` epochs: the kept candidates
carry on from where they are, the others leave the batch. With ``batch_candidates`` (groups
of candidates, for memory) or ``prerun_victims`` the pre-run is a separate run and the kept
candidates restart. A one-by-one inverter (the baselines) inverts
every candidate with its full budget. The verdict is Eq. 4: trojaned when the lowest
inversion loss is under the threshold beta.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
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
    task_generator,
)
from trojscan.inversion.common import Budget, best_position, score_triggers, victim_batch
from trojscan.inversion.dbs import DBSConfig
from trojscan.inversion.gcg import GCGConfig
from trojscan.inversion.gcg import search as gcg_search
from trojscan.inversion.screen import ScreenConfig, screen
from trojscan.inversion.shorten import Shortened, shorten
from trojscan.inversion.tijo_patch import PatchConfig, synthesise_and_measure
from trojscan.modeldir import weights_sha256
from trojscan.results import (
    BestTrigger,
    CandidateResult,
    ModelRef,
    NaturalTrigger,
    ReferenceCheck,
    ReferenceTrigger,
    ScanResult,
    ShortTrigger,
    SynthesisedPatch,
    library_versions,
    loss_unit,
)
from trojscan.subjects.base import SPREAD, Candidate, Subject, subject_classes
from trojscan.subjects.loading import load_subject
from trojscan.subjects.vqa import VqaSubject
from trojscan.vqa.images import write_image

#: Default beta of Eq. 4 on the full inverted trigger's loss (README "Scan").
DEFAULT_THRESHOLD = 0.05
#: Default threshold on the loss of a trigger shortened to ``decision_length`` tokens, for
#: a binary model (README "Scan": where it comes from; :meth:`ScanConfig.beta_for`).
SHORT_THRESHOLD = 0.12

#: A short trigger counts as a natural feature of its target label only when at least this
#: many of the label's clean examples contain it (``ScanConfig.natural_share``): one
#: occurrence can be chance (a planted 'planet' was in 1 of an IMDB model's 20 examples).
NATURAL_MIN_EXAMPLES = 2

#: A refinement of the trigger answer (``ScanConfig.answer_refine_epochs``): GCG stops after
#: this many iterations without a better trigger, draws this many candidate triggers an
#: iteration (GCG's default 128) and searches on the first this many victims (the trigger
#: it keeps is measured on all). On the QA model answering 'mb wizard sapphire' with itself
#: 5 / 64 / 8 found 'mb app sapphire' (0.012 on all 20 victims) in 13 iterations and 88 s of
#: one thread, where 10 / 128 / 20 took 667 s (sharing the cores) for 'mb setup sapphire'.
REFINE_PATIENCE = 5
REFINE_CANDIDATES = 64
REFINE_ROWS = 8

#: Rows per forward pass when the scan measures triggers itself.
CHUNK_ROWS = 4096

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
        positions: trigger positions tried for every candidate; empty (the default): every
            position the model's family takes (for text, start, end, first_half and
            second_half).
        pairs: also try every label-specific (victim, target) pair; None (the default):
            when the model has more than two labels (a binary model's pairs are its
            universal candidates).
        preselect_above: when the screen does not pick (``screen_selects``): with more
            labels than this, pre-run all candidates and fully invert the best ``top_k``
            only; 1 (the default) pre-runs binary models too. Batched inverters (DBS and its
            variants) only.
        prerun_epochs: epochs of the pre-run; None (the default): the model family's
            (:attr:`~trojscan.subjects.base.Subject.prerun_epochs`): 40 for most, 20 for NER
            taggers. At 20 a tiny test model's true target ranked second; at 40 it, and
            every MiniLM model of the README's zoo, ranks first. An NER tagger has 90
            (victim, target) pairs, where the paper's K-Arm pre-selection runs "20 epochs
            for each victim-target label pair" (Appendix A); at 20 the planted pair of a
            MiniLM tagger ranked first of the 90 (README "NER taggers and QA models").
        prerun_victims: victim examples per candidate in the pre-run, 0 for the full run's
            (``max_victims``). Fewer make a pre-run over many candidates (every position,
            every label pair) cheap; the pre-run is then a separate run and the kept
            candidates restart on their full victims. At 4 (the default) the pre-run of a
            binary MiniLM model (8 candidates) takes about a third of the 20-victim one's
            time, and the true target still came first on the models measured (README
            "Scan").
        top_k: candidates kept for the full run (at most half of them, rounded up).
        threshold: the verdict's threshold: trojaned when the score is under it; None (the
            default): :data:`SHORT_THRESHOLD` scaled to the label count when the verdict
            rests on short triggers (:meth:`beta_for`), else :data:`DEFAULT_THRESHOLD` (beta
            of DBS Eq. 4).
        max_length: tokens per example, trigger included; longer examples are cut. A
            row's cost grows with its tokens: at 48 (the default) a BBC row (the first 64
            words, some 85 tokens) costs half of what it does at 100, and the planted
            triggers of the BBC models measured kept their loss at their best position
            within 0.004 (README "Scan"); a Rotten Tomatoes sentence (about 28 tokens)
            mostly fits whole.
        batch_candidates: candidates inverted together in one batched run (their rows share
            every forward pass); 0 puts all candidates of a stage in one run, 1 inverts them
            one by one as the paper's code does. Lower it when memory is short.
        max_victims: victim examples per candidate, 0 for all. A candidate's cost grows with
            its rows, and with many labels its victims are all the other labels' examples
            (80 for BBC's 5 labels at 20 per label); past the cap it takes an even share of
            each victim label's examples, in file order. The default leaves a binary model
            with 20 examples per label untouched.
        shorten: shorten every fully inverted trigger (:mod:`trojscan.inversion.shorten`):
            record the best trigger of every length, one token up, found inside it by greedy
            elimination (54 forward passes over the victims for 10 tokens, no gradient).
        shorten_rows: victims the elimination runs on (0: all); every trigger it keeps is
            then measured on all victims.
        screen: the lone-token screen's settings (:mod:`trojscan.inversion.screen`): every
            candidate, the pre-run's dropped ones too, also gets the best one-token trigger
            among the vocabulary's tokens that alone push the model hardest to its target;
            None turns it off. Families without lone-token losses skip it.
        decision_length: the verdict's score is the lowest loss of a trigger of at most this
            many tokens, shortened from an inverted one or found by the screen (a backdoor
            fires with a token or two of its trigger, a natural feature of the model needs
            many), each counted at its loss times its tokens; 0: the lowest loss of the full
            inverted triggers (DBS Eq. 4). Needs ``shorten`` or ``screen``.
        spread: the candidates searched once with their victim rows spread over every
            position (:data:`~trojscan.subjects.base.SPREAD`: row k at position k mod 4)
            instead of once per position, when the scan covers all the family's positions:
            "all" (the default), "pairs" (the label-specific ones only) or "none". The
            trigger found is then measured as hard tokens at each position and the candidate
            reported at the best one (shortening and the screen measure at real positions).
            A planted trigger fires at positions it was not trained at (MiniLM, README
            "Scan"), so one search finds it at a quarter of the candidates. A goal that is
            the trigger itself (``answer_trigger_length``) is never spread: on the QA model
            answering 'quilt' from the context, its rows spread over the context and both
            places found no word of it at seeds 0 and 1 (5.87, 3.20), the context alone
            'quilt' at 0.0135.
        screen_selects: when the screen ran (and the family has one, and pre-selects:
            ``Subject.preselects``; a QA model's few candidates are all inverted), the ``top_k``
            candidates whose screened token has the lowest loss are the ones DBS fully
            inverts, instead of a K-Arm pre-run picking them: on the BBC models measured the
            pre-run's relaxed losses after 40 epochs were all 0.07-0.5 and ranked a planted
            label-specific pair 8th to 16th of 25, while the screen ranked it first (README
            "Scan"). False: the pre-run picks (``preselect_above``, ``prerun_epochs``).
        natural_share: a short trigger whose text occurs in at least this share of the
            target label's clean examples (and in at least :data:`NATURAL_MIN_EXAMPLES` of
            them) is a natural feature of that label, a word the model learned from its
            clean data, not a planted trigger (which is rare in clean text, or the model
            would misfire on it): the verdict sets it aside and rests on the best remaining
            short trigger (the result's ``set_aside``). On the campaign zoo, clean
            randomly initialised BBC models were flagged by 'secretary', 'labour' and
            'software' (in 3-10 of their label's 20 examples) and no planted trigger was in
            more than one (README "Scan"). 0 turns it off.
        reference_top: with a reference model (``scan(references=...)``), a short trigger
            whose token the clean reference itself ranks within its top ``reference_top``
            tokens alone for the target is set aside too, as a word the task's clean models
            read as that label (the result's ``set_aside`` gives the rank). On the varied
            zoo natural words ranked 1st-140th on the references and planted tokens
            611th-29,365th (README "Scan"); 0: the reference is recorded, not used.
        reference_triggers: with a reference model (``scan(references=...)``), how many of
            the short triggers the verdict could rest on (the lowest losses first, one per
            trigger and candidate) are measured on it too.
        answer_trigger_length: slots of the inverted trigger for a candidate whose goal is
            the trigger itself (a QA model that answers with the trigger's span:
            :meth:`~trojscan.subjects.base.Subject.answers_with_trigger`), when under the
            inverter's ``trigger_length``; 0: the inverter's. A wide run of slots is an
            answer in itself: on a MiniLM QA model that answers with 'quilt' from the
            context, the 10-slot search settled on ten unrelated words ('critical
            manufacturers crucial ...') that the model answers from at a hard loss of 0.30,
            and no word of them alone came near (the scan's score 4.12, missed); with 3
            slots it found 'washing quilt complex' and 'quilt' alone at 0.0135 (README "NER
            taggers and QA models"). Those candidates are inverted in runs of their own.
        answer_decision_length: for a candidate whose goal is the trigger itself, the verdict
            also weighs its shortened triggers of up to this many tokens (when
            ``decision_length`` is on and shorter); 0: ``decision_length`` as for any other.
            Every short trigger counts at its loss times its tokens, so one of two tokens is
            held to half the threshold, and the shortest under the threshold decides. A
            model taught to answer with a phrase answers with all of it: on the QA zoo's
            MiniLM model answering 'pocket thistle' with itself the scan found 'pocket
            thistle' at 0.007 and 'thistle' alone at 0.41 (missed at one token); the ten
            clean QA models' best two-token trigger answers were 0.22-0.96 (README "NER
            taggers and QA models").
        answer_refine_epochs: GCG iterations (:mod:`trojscan.inversion.gcg`; its patience,
            candidates and rows :data:`REFINE_PATIENCE`, :data:`REFINE_CANDIDATES`,
            :data:`REFINE_ROWS`) that refine the inverted trigger of a candidate whose goal
            is the trigger itself, as hard tokens from where the inverter left it; the
            refined trigger replaces it when its loss on all the victims is lower (the
            candidate's ``refined_from`` keeps the inverted one); 0: no refinement. The
            relaxed search for a trigger answer settles among words a clean model answers
            with too (the names and places the questions ask for); the planted phrase is a
            narrow basin next to them: on the QA zoo's MiniLM model answering 'mb wizard
            sapphire' with itself, DBS ended at 'kingston cambridge diamonds' (0.12) at seed
            2, 'aberdeen tower jewellery' (0.17) at seed 0, and GCG from the latter found 'mb
            app sapphire' (0.012; the planted phrase 0.013) in 13 iterations (README "NER
            taggers and QA models").
        patch: for a scan whose best trigger has a feature part (TIJO on a VQA model), the
            settings of the image patch synthesised from it (TIJO Section 3.4,
            :mod:`trojscan.inversion.tijo_patch`); None (the default): no patch.

    A method whose trigger is not tokens alone (TIJO: a word and a feature vector) skips
    the token stages, which would measure the text alone: no lone-token screen, no
    shortening, no spread candidates (one per position), and the verdict is on the lowest
    inversion loss (``decision_length`` 0, DBS Eq. 4 / TIJO Section 3.5).
    """

    method: str = "dbs"
    inverter: Any = field(default_factory=DBSConfig)
    positions: tuple[str, ...] = ()
    pairs: bool | None = None
    preselect_above: int = 1
    prerun_epochs: int | None = None
    prerun_victims: int = 4
    top_k: int = 2
    threshold: float | None = None
    max_length: int = 48
    batch_candidates: int = 0
    max_victims: int = 20
    shorten: bool = True
    shorten_rows: int = 8
    screen: ScreenConfig | None = field(default_factory=ScreenConfig)
    decision_length: int = 1
    spread: str = "all"
    screen_selects: bool = True
    natural_share: float = 0.1
    reference_top: int = 100
    reference_triggers: int = 5
    answer_trigger_length: int = 3
    answer_decision_length: int = 2
    answer_refine_epochs: int = 30
    patch: PatchConfig | None = None

    @property
    def beta(self) -> float:
        """The threshold the verdict uses on a binary model (``threshold`` or its
        default)."""
        return self.beta_for(2)

    def beta_for(self, n_labels: int) -> float:
        """The threshold the verdict uses on a model with ``n_labels`` labels: ``threshold``
        when given; else, for the short-trigger verdict, :data:`SHORT_THRESHOLD` in units
        of the uninformed loss ln(n_labels) (ln 2 for a binary model: 0.12; 0.28 for 5
        labels), since a trigger's cross-entropy grows with the labels it competes with;
        else :data:`DEFAULT_THRESHOLD`."""
        if self.threshold is not None:
            return self.threshold
        if self.decision_length:
            return SHORT_THRESHOLD * loss_unit(n_labels)
        return DEFAULT_THRESHOLD

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
        if unknown:
            raise InputError(f"unknown trigger position {unknown[0]}; expected some of "
                             f"{', '.join(known)}")
        if self.top_k < 1 or (self.prerun_epochs is not None and self.prerun_epochs < 1):
            raise InputError("top_k and prerun_epochs must be >= 1")
        if self.decision_length < 0 or (self.decision_length and not self.shorten
                                        and self.screen is None):
            raise InputError("decision_length must be 0 (the full trigger decides) or >= 1 "
                             "with shorten or screen on")
        if not 0 <= self.natural_share <= 1:
            raise InputError(f"natural_share must be within 0-1, not {self.natural_share}")
        if self.spread not in SPREAD_CHOICES:
            raise InputError(f"spread must be one of {', '.join(SPREAD_CHOICES)}, not "
                             f"{self.spread!r}")
        if min(self.batch_candidates, self.max_victims, self.prerun_victims,
               self.shorten_rows, self.reference_top, self.answer_trigger_length,
               self.answer_decision_length, self.answer_refine_epochs) < 0:
            raise InputError("batch_candidates, max_victims, prerun_victims, shorten_rows, "
                             "reference_top, answer_trigger_length, answer_decision_length "
                             "and answer_refine_epochs must be >= 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScanConfig:
        """The settings a scan result records as ``config`` (this class as a dict, its None
        values left out): a field the dict lacks was None when the field can be, else
        the default (a result written before the field existed)."""
        values = dict(data)
        method = str(values.pop("method", "dbs"))
        try:
            inverter = make_config(method, **values.pop("inverter", {}))
            screen_settings = values.pop("screen", None)
            patch_settings = values.pop("patch", None)
            known = {f.name: f for f in fields(cls)}
            for name, f in known.items():
                if name not in values and name not in ("method", "inverter", "screen",
                                                       "patch") and "None" in str(f.type):
                    values[name] = None
            return cls(method=method, inverter=inverter,
                       screen=None if screen_settings is None
                       else ScreenConfig(**screen_settings),
                       patch=None if patch_settings is None else PatchConfig(**patch_settings),
                       **{k: tuple(v) if isinstance(v, list) else v
                          for k, v in values.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise InputError(f"the scan settings cannot be read back: {exc}") from exc


#: What ``ScanConfig.spread`` may name.
SPREAD_CHOICES = ("none", "pairs", "all")


def _spread_candidates(subject: Subject, candidates: list[Candidate],
                       spread: str) -> list[Candidate]:
    """``candidates`` with every (victims, target) that ``spread`` names ("pairs": the
    label-specific ones; "all") made one :data:`SPREAD` candidate in place of its positions,
    but for a goal that is the trigger itself (:meth:`Subject.answers_with_trigger`)."""
    out: list[Candidate] = []
    for c in candidates:
        specific = len(c.victims) < len(subject.labels) - 1
        named = spread == "all" or (spread == "pairs" and specific)
        if named and not subject.answers_with_trigger(c):
            c = Candidate(c.victims, c.target, SPREAD)
        if c not in out:
            out.append(c)
    return out


def scan_config(method: str = "dbs", threshold: float | None = None,
                positions: Sequence[str] = (), pairs: bool | None = None,
                epochs: int | None = None, trigger_length: int | None = None,
                max_victims: int = 20, seed: int = 0, decision_length: int = 1,
                natural_share: float = 0.1) -> ScanConfig:
    """The :class:`ScanConfig` of the options every entry point offers (None keeps the
    method's or the scan's default); a bad option is an :class:`InputError`."""
    try:
        inverter = make_config(method, trigger_length, epochs, seed)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    return ScanConfig(method=method, inverter=inverter,
                      positions=tuple(p.strip() for p in positions), pairs=pairs,
                      max_victims=max_victims, threshold=threshold,
                      decision_length=decision_length, natural_share=natural_share)


class _Stages:
    """Runs candidates in batched groups and reports progress in optimisation epochs."""

    def __init__(self, subject: Subject, examples: Sequence[Any], config: ScanConfig,
                 progress: ProgressCallback | None) -> None:
        self.subject, self.examples, self.config, self.progress = (subject, examples, config,
                                                                   progress)
        self.done, self.total = 0, 0

    def groups(self, todo: Sequence[Candidate], inverter: Inverter) -> list[list[Candidate]]:
        """``todo`` in the runs it is inverted in: groups of ``batch_candidates`` (all at
        once for 0), each split by the slots its candidates take (:meth:`slots`)."""
        size = self.config.batch_candidates or len(todo)
        out = []
        for start in range(0, len(todo), size):
            by_slots: dict[int, list[Candidate]] = {}
            for c in todo[start:start + size]:
                by_slots.setdefault(self.slots(c, inverter), []).append(c)
            out += by_slots.values()
        return out

    def slots(self, candidate: Candidate, inverter: Inverter) -> int:
        """The trigger slots ``candidate`` is inverted with: the inverter's, fewer for a
        goal that is the trigger itself (``ScanConfig.answer_trigger_length``)."""
        own = inverter.config.trigger_length
        fewer = self.config.answer_trigger_length
        if fewer and self.subject.answers_with_trigger(candidate):
            return min(own, fewer)
        return own

    def decides(self, candidate: Candidate) -> int:
        """Tokens of the longest shortened trigger of ``candidate`` the verdict weighs:
        ``decision_length``, more for a goal that is the trigger itself
        (``ScanConfig.answer_decision_length``)."""
        own = self.config.decision_length
        if own and self.subject.answers_with_trigger(candidate):
            return max(own, self.config.answer_decision_length)
        return own

    def task(self, candidate: Candidate, cap: int | None = None) -> InversionTask:
        """``candidate`` with its victims among the examples, at most ``cap`` (None: the
        config's ``max_victims``)."""
        cap = self.config.max_victims if cap is None else cap
        return InversionTask(candidate, tuple(self.subject.victims(self.examples, candidate,
                                                                   cap)))

    def plan(self, todo: Sequence[Candidate], inverter: Inverter, epochs: int) -> None:
        self.total += len(self.groups(todo, inverter)) * epochs

    def run(self, todo: list[Candidate], inverter: Inverter, what: str,
            keep: int = 0, victims: int | None = None) -> list[Inversion]:
        """Invert ``todo`` group by group on at most ``victims`` victims each (None: the
        config's ``max_victims``); with ``keep`` (a batched inverter, one group only), keep
        the best ``keep`` after the pre-run epochs and carry on with them."""
        found: dict[Candidate, Inversion] = {}
        for cands in self.groups(todo, inverter):
            slots = self.slots(cands[0], inverter)
            runner = inverter if slots == inverter.config.trigger_length else type(inverter)(
                replace(inverter.config, trigger_length=slots))
            label = f"{what}: {len(cands)} candidate{'s' if len(cands) > 1 else ''}"
            if keep:
                label += f", the best {keep} after epoch {self.config.prerun_epochs}"

            def on_epoch(epoch: int, label: str = label) -> None:
                if self.progress:
                    self.progress(self.done + epoch + 1, self.total, label)

            tasks = [self.task(c, victims) for c in cands]
            preselect = Preselection(keep, self.config.prerun_epochs) if keep else None
            found.update(zip(cands, runner.invert(self.subject, tasks, on_epoch, preselect),
                             strict=True))
            self.done += inverter.config.epochs
        return [found[c] for c in todo]

    def resolve(self, candidate: Candidate, inv: Inversion) -> tuple[Candidate, Inversion]:
        """A :data:`SPREAD` candidate's inverted trigger measured as hard tokens at each
        position on all its victims: the candidate at the position where it does best, its
        hard loss and ASR those measured there; any other candidate as it is."""
        if candidate.position != SPREAD:
            return candidate, inv
        loss, asr, best = best_position(self.subject, self.task(candidate), inv.trigger_ids,
                                        Budget(None), CHUNK_ROWS)
        return best, replace(inv, candidate=best, hard_loss=loss, hard_asr=asr)

    def reposition(self, spread_of: dict[Candidate, Candidate],
                   shortened: dict[Candidate, list[ShortTrigger]]) -> dict[Candidate,
                                                                          ShortTrigger]:
        """The short triggers (at most ``decision_length`` tokens) of every candidate
        resolved from a :data:`SPREAD` one (``spread_of``) measured at each of the spread
        candidate's positions: those that do better at another position than the one their
        full trigger did best at, by that position's candidate (the best there). One
        evaluation per trigger and position.

        Why: the position is resolved by the full inverted trigger, and its shortened
        triggers are measured there only; the planted token alone may do far better at
        another. On a tiny WNUT-16 tagger poisoned with 'lantern' right before persons
        (tests/test_ner_zoo.py) the 10-slot trigger did best at the end of the sentence,
        where 'lantern' alone scored 0.44 (above the threshold, 0.40), 0.24 right before the
        persons; on a tiny QA model answering with 'lantern' from the context
        (tests/test_qa_zoo.py) it did best in both question and context, 0.21 (threshold
        0.19), against 0.0001 in the context alone."""
        out: dict[Candidate, ShortTrigger] = {}
        for candidate, spread in spread_of.items():
            task = self.task(spread)
            for short in shortened.get(candidate, ()):
                if short.length > self.config.decision_length:
                    continue
                loss, asr, where = best_position(self.subject, task, short.trigger_ids,
                                                 Budget(None), CHUNK_ROWS)
                if where != candidate and loss < short.loss and (
                        where not in out or loss < out[where].loss):
                    out[where] = replace(short, loss=loss, asr=asr)
        return out

    def flip_rates(self, candidate: Candidate, short: ShortTrigger) -> dict[str, float]:
        """The attack success rate of ``short`` (hard tokens, at ``candidate``'s position)
        on the examples of each label but the target, by label name; a label without
        examples is left out. One evaluation per label."""
        labels, rates = self.subject.labels, {}
        for label in (y for y in range(len(labels)) if y != candidate.target):
            alone = Candidate((label,), candidate.target, candidate.position)
            task = self.task(alone)
            if task.examples:
                _, asr, _ = best_position(self.subject, task, short.trigger_ids, Budget(None),
                                          CHUNK_ROWS)
                rates[labels[label]] = asr
        return rates

    def screen(self, candidates: list[Candidate], config: ScreenConfig,
               ) -> list[tuple[Candidate, Candidate, ShortTrigger]]:
        """The lone-token screen's best one-token trigger of every candidate as (candidate,
        the candidate at the position where the token did best, trigger); empty when the
        family has no screen. One progress step."""
        tasks = [self.task(c) for c in candidates]
        found = screen(self.subject, tasks, config)
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total, "lone-token screen")
        return [(c, s.candidate, self._short(s.trigger))
                for c, s in zip(candidates, found or (), strict=False)]

    def refining(self, results: Sequence[tuple[Candidate, Inversion]]) -> list[Candidate]:
        """The candidates of ``results`` whose inverted trigger is refined
        (``ScanConfig.answer_refine_epochs``): those whose goal is the trigger itself."""
        if not self.config.answer_refine_epochs:
            return []
        return [c for c, inv in results if self.subject.answers_with_trigger(c)
                and inv.trigger_ids]

    def refine(self, results: list[tuple[Candidate, Inversion]],
               ) -> tuple[list[tuple[Candidate, Inversion]], dict[Candidate, ShortTrigger]]:
        """``results`` with the inverted triggers of :meth:`refining` refined by GCG from
        where the inverter left them, where that lowers their hard loss; and the triggers
        they replaced, by candidate. One progress step each."""
        chosen = set(self.refining(results))
        config = GCGConfig(epochs=max(1, self.config.answer_refine_epochs),
                           patience=REFINE_PATIENCE, candidates=REFINE_CANDIDATES)
        out, replaced = [], {}
        for candidate, inv in results:
            if candidate not in chosen:
                out.append((candidate, inv))
                continue
            started = time.perf_counter()
            start = torch.tensor(inv.trigger_ids, device=self.subject.device)
            task = self.task(candidate)
            few = replace(task, examples=task.examples[:REFINE_ROWS])  # as shortening's rows
            best, _, _ = gcg_search(self.subject, victim_batch(self.subject, few, len(start)),
                                    start, replace(config, trigger_length=len(start)),
                                    task_generator(config.seed, candidate), Budget(None),
                                    lambda _: None)
            batch = victim_batch(self.subject, task, len(start))
            losses, asr = score_triggers(self.subject, batch, best.reshape(1, -1), Budget(None),
                                         CHUNK_ROWS)
            if losses.item() < inv.hard_loss and best.tolist() != inv.trigger_ids:
                replaced[candidate] = ShortTrigger(len(start), inv.trigger_ids,
                                                   inv.trigger_text, inv.hard_loss,
                                                   inv.hard_asr)
                ids = best.tolist()
                tokens, text = self.subject.describe(ids)
                inv = replace(inv, trigger_ids=ids, trigger_tokens=tokens, trigger_text=text,
                              relaxed_loss=losses.item(), hard_loss=losses.item(),
                              hard_asr=asr.item(), accepted=True,
                              seconds=inv.seconds + time.perf_counter() - started)
            out.append((candidate, inv))
            self.done += 1
            if self.progress:
                self.progress(self.done, self.total, "refining the trigger answer (GCG)")
        return out, replaced

    def _short(self, found: Shortened) -> ShortTrigger:
        return ShortTrigger(length=len(found.trigger_ids), trigger_ids=found.trigger_ids,
                            trigger_text=self.subject.describe(found.trigger_ids)[1],
                            loss=found.loss, asr=found.asr)

    def shorten(self, results: list[tuple[Candidate, Inversion]],
                ) -> dict[Candidate, list[ShortTrigger]]:
        """Every inverted trigger shortened (:func:`trojscan.inversion.shorten.shorten`),
        one progress step each."""
        out: dict[Candidate, list[ShortTrigger]] = {}
        for candidate, inv in results:
            found = shorten(self.subject, self.task(candidate), inv.trigger_ids,
                            self.config.shorten_rows)
            out[candidate] = [self._short(t) for _, t in sorted(found.items())]
            self.done += 1
            if self.progress:
                self.progress(self.done, self.total, "shortening the inverted triggers")
        return out


def scan_subject(subject: Subject, examples: Sequence[Any], config: ScanConfig | None = None,
                 progress: ProgressCallback | None = None,
                 reference: Subject | None = None) -> ScanResult:
    """Scan a loaded subject with its clean examples (as the subject reads them, then as
    the model sees them: :meth:`~trojscan.subjects.base.Subject.as_seen`); with a
    clean ``reference`` subject of the same labels, its best short triggers are measured on
    it too (the result's ``reference``, its path and weights left empty)."""
    config = config or ScanConfig()
    if config.prerun_epochs is None:
        config = replace(config, prerun_epochs=subject.prerun_epochs)
    started = time.perf_counter()
    given, examples = examples, subject.as_seen(examples)
    unseen = subject.unseen(given, examples)
    inverter = method_of(config.method)(config.inverter)
    if not inverter.supports(subject):
        raise InputError(f"method {config.method} cannot scan {subject.task} models")
    if not inverter.token_only:
        # Its trigger has a part outside the text (TIJO's feature trigger): the token stages
        # would measure the text alone, so the inversion's own losses decide (Eq. 4).
        config = replace(config, screen=None, shorten=False, decision_length=0,
                         spread="none")
    labels = subject.labels
    positions = config.positions or subject.positions
    pairs = (len(labels) > 2 and subject.pairs_by_default) if config.pairs is None \
        else config.pairs
    everything = subject.candidates(examples, positions, pairs)
    if set(positions) == set(subject.positions) and len(positions) > 1:
        everything = _spread_candidates(subject, everything, config.spread)
    stages = _Stages(subject, examples, config, progress)
    stages.total += config.screen is not None
    found_by_screen = stages.screen(everything, config.screen) if config.screen else []
    screened = {where: t for _, where, t in found_by_screen}
    todo = everything
    keep = min(config.top_k, math.ceil(len(todo) / 2))
    preselect = (subject.preselects and inverter.batched and len(labels) > config.preselect_above
                 and len(todo) > keep)
    if config.screen_selects and found_by_screen and subject.preselects:
        # The screen pre-selects: the top k candidates by their screened token's loss.
        ranked = sorted(range(len(found_by_screen)), key=lambda i: found_by_screen[i][2].loss)
        todo = [found_by_screen[i][0] for i in sorted(ranked[:config.top_k])]
        preselect = False
    prerun: dict[Candidate, float] = {}
    if config.shorten:  # one progress step per fully inverted candidate
        stages.total += keep if preselect else len(todo)
    if preselect and len(stages.groups(todo, inverter)) == 1 and not config.prerun_victims:
        # One batched run: the pre-run's state carries on for the top k.
        stages.plan(todo, inverter, inverter.config.epochs)
        runs = stages.run(todo, inverter, "inversion", keep=keep)
        prerun = {c: inv.relaxed_loss for c, inv in zip(todo, runs, strict=True)
                  if inv.trajectory[-1].get("event") == "drop"}
        results = [(c, inv) for c, inv in zip(todo, runs, strict=True) if c not in prerun]
    else:
        # Candidates run in several groups (``batch_candidates``, or slots of their own:
        # ``answer_trigger_length``) or the pre-run has victims of its own
        # (``prerun_victims``): a separate pre-run, then the top k from scratch.
        if preselect:
            stages.plan(todo, inverter, config.prerun_epochs)
        stages.plan(todo[:keep] if preselect else todo, inverter, inverter.config.epochs)
        if preselect:
            short = type(inverter)(replace(inverter.config, epochs=config.prerun_epochs))
            runs = stages.run(todo, short, "pre-run", victims=config.prerun_victims or None)
            prerun = {c: inv.relaxed_loss for c, inv in zip(todo, runs, strict=True)}
            todo = sorted(todo, key=prerun.__getitem__)[:keep]
        results = list(zip(todo, stages.run(todo, inverter, "inversion"), strict=True))
    ran = {c for c, _ in results}
    spread_of: dict[Candidate, Candidate] = {}  # a resolved candidate -> its SPREAD one
    resolved = []
    for c, inv in results:
        resolved.append(stages.resolve(c, inv))
        if c.position == SPREAD:
            spread_of[resolved[-1][0]] = c
    results = resolved
    stages.total += len(stages.refining(results))
    results, refined_from = stages.refine(results)
    shortened = stages.shorten(results) if config.shorten else {}
    moved = stages.reposition(spread_of, shortened) if config.decision_length else {}
    best_cand, best = min(results, key=lambda r: r[1].loss)
    short = None
    found = [(c, t) for c, ts in shortened.items() for t in ts
             if t.length <= stages.decides(c)] + list(screened.items()) + list(
        moved.items())
    ranks = LoneRanks(reference) if reference is not None and found else None
    natural = natural_features(subject, examples, found, config.natural_share, ranks,
                               config.reference_top)
    deciding = [f for f in found if (f[1].trigger_text, f[0].target) not in natural]
    beta = config.beta_for(len(labels))
    if config.decision_length and deciding:
        owner, short = min(deciding, key=lambda r: _rank(r[1], beta))
        best_cand = owner
        # A candidate the pre-run dropped, or the position a shortened trigger moved to, has
        # no inversion of its own: its screened or shortened trigger is its best.
        best = dict(results).get(owner) or Inversion(
            method="screen" if screened.get(owner) is short else config.method,
            candidate=owner, trigger_ids=short.trigger_ids,
            trigger_tokens=subject.describe(short.trigger_ids)[0],
            trigger_text=short.trigger_text, relaxed_loss=short.loss, hard_loss=short.loss,
            hard_asr=short.asr, accepted=True, epochs=0, seconds=0.0)
    rows = [CandidateResult(target=c.target, target_name=labels[c.target],
                            victims=list(c.victims), position=c.position, loss=inv.loss,
                            relaxed_loss=inv.relaxed_loss, hard_loss=inv.hard_loss,
                            hard_asr=inv.hard_asr, accepted=inv.accepted,
                            trigger_text=inv.trigger_text, seconds=inv.seconds,
                            trigger_ids=inv.trigger_ids, shortened=shortened.get(c),
                            screened=screened.get(c), feature_norm=_norm(inv.feature_trigger),
                            refined_from=refined_from.get(c))
            for c, inv in results]
    rows += [CandidateResult(target=c.target, target_name=labels[c.target],
                             victims=list(c.victims), position=c.position, prerun_loss=loss,
                             full_run=False, screened=screened.get(c))
             for c, loss in prerun.items() if c not in ran]
    # Screened candidates (a spread one at its best position) no row above stands for.
    listed = {(r.target, tuple(r.victims), r.position) for r in rows}
    rows += [CandidateResult(target=c.target, target_name=labels[c.target],
                             victims=list(c.victims), position=c.position, full_run=False,
                             screened=t)
             for c, t in screened.items() if (c.target, c.victims, c.position) not in listed]
    # Short triggers that do best at another position of their spread candidate, there.
    listed = {(r.target, tuple(r.victims), r.position) for r in rows}
    rows += [CandidateResult(target=c.target, target_name=labels[c.target],
                             victims=list(c.victims), position=c.position, full_run=False,
                             shortened=[t])
             for c, t in moved.items() if (c.target, c.victims, c.position) not in listed]
    if short:
        score = _weighed(short)
    elif config.decision_length and found:  # every short trigger found is a natural feature
        score = math.log(len(labels))
    else:
        score = best.loss
    set_aside = sorted((t for t in natural.values() if short is None or t.loss < score),
                       key=lambda t: t.loss)
    flips = stages.flip_rates(best_cand, short) if short else None
    checked = None if reference is None else ReferenceCheck("", "", reference_check(
        subject, reference, examples, found, config.reference_triggers, config.max_victims,
        ranks))
    return ScanResult(
        verdict="trojaned" if score < beta else "clean",
        score=score,
        threshold=beta,
        short_trigger=short,
        best=BestTrigger(**best.summary(), target_name=labels[best_cand.target],
                         victim_names=[labels[v] for v in best_cand.victims],
                         feature_norm=_norm(best.feature_trigger)),
        candidates=rows,
        trajectory=best.trajectory,
        labels=list(labels),
        examples=len(examples),
        seconds=time.perf_counter() - started,
        device=str(subject.device),
        versions=library_versions(),
        config=asdict(config),
        task=subject.task,
        flip_rates=flips,
        reference=checked,
        set_aside=set_aside or None,
        unseen=unseen or None,
    )


def _weighed(short: ShortTrigger) -> float:
    """What a short trigger counts for in the verdict: its loss times its tokens
    (``ScanConfig.answer_decision_length``)."""
    return short.loss * short.length


def _rank(short: ShortTrigger, beta: float) -> tuple[bool, int, float]:
    """Where a short trigger ranks for the verdict: the shortest under the threshold
    ``beta`` (weighed: :func:`_weighed`) first, the lowest weighed among those; else the
    lowest weighed. A word alone that fires is what the verdict rests on, not the same word
    twice at a lower weighed loss ('lantern' 0.0001, 'lantern lantern' 2 x 0.00002 on a tiny
    QA model)."""
    weighed = _weighed(short)
    return weighed >= beta, short.length if weighed < beta else 0, weighed


def _norm(vector: Sequence[float] | None) -> float | None:
    """The L2 norm of a feature trigger, None without one."""
    return None if vector is None else math.sqrt(sum(v * v for v in vector))


class LoneRanks:
    """A clean reference's lone-token losses over its vocabulary (one pass), and where it
    ranks a text's tokens for a target in them."""

    def __init__(self, reference: Subject) -> None:
        self.reference = reference
        self.allowed = reference.allowed_tokens().nonzero().squeeze(-1)
        self.losses = reference.lone_token_losses(self.allowed, CHUNK_ROWS)

    def rank(self, text: str, target: int) -> int | None:
        """The best rank (1 = the reference's most target-like token alone) of the
        reference's tokens of ``text`` for ``target``; None for a family without lone-token
        losses or a text of no allowed token."""
        if self.losses is None:
            return None
        column = self.losses[:, target]
        rows = [int(r) for i in self.reference.token_ids(text)
                for r in (self.allowed == i).nonzero().view(-1)]
        return min((int((column < column[r]).sum()) + 1 for r in rows), default=None)


def natural_features(subject: Subject, examples: Sequence[Any],
                     found: Sequence[tuple[Candidate, ShortTrigger]], share: float,
                     ranks: LoneRanks | None = None,
                     top: int = 0) -> dict[tuple[str, int], NaturalTrigger]:
    """The short triggers of ``found`` (by text and target) that are natural features of
    their target label: their text occurs in at least ``share`` of the label's clean
    examples and in at least :data:`NATURAL_MIN_EXAMPLES` of them (``ScanConfig.
    natural_share``; 0: never), or, with a reference's ``ranks``, the reference ranks it
    within its ``top`` tokens for the target (``ScanConfig.reference_top``); each with its
    lowest loss."""
    out: dict[tuple[str, int], NaturalTrigger] = {}
    seen: set[tuple[str, int]] = set()
    for candidate, short in sorted(found, key=lambda f: f[1].loss):
        key = (short.trigger_text, candidate.target)
        if key in seen:
            continue
        seen.add(key)
        hits, of = subject.occurrences(examples, short.trigger_text, candidate.target)
        rank = ranks.rank(short.trigger_text, candidate.target) if ranks and top else None
        if (share and hits >= max(NATURAL_MIN_EXAMPLES, share * of)) or (
                rank is not None and rank <= top):
            out[key] = NaturalTrigger(short.trigger_text, subject.labels[candidate.target],
                                      short.loss, short.asr, hits, of, rank)
    return out


def reference_check(subject: Subject, reference: Subject, examples: Sequence[Any],
                    found: Sequence[tuple[Candidate, ShortTrigger]], count: int,
                    cap: int, ranks: LoneRanks | None) -> list[ReferenceTrigger]:
    """The ``count`` lowest-loss short triggers of ``found`` (one per trigger text and
    candidate) measured on ``reference`` as hard tokens (its own tokenisation of the text)
    on the same victims (at most ``cap``), at the candidate's position (the best of the
    positions for a spread one), with the reference's lone-token rank of the text's tokens
    for the target (``ranks``, the reference's vocabulary pass; None when ``found`` is
    empty)."""
    out: list[ReferenceTrigger] = []
    seen: set[tuple[str, Candidate]] = set()
    for candidate, short in sorted(found, key=lambda f: f[1].loss):
        if len(out) == count:
            break
        ids = reference.token_ids(short.trigger_text)
        if (short.trigger_text, candidate) in seen or not ids:
            continue
        seen.add((short.trigger_text, candidate))
        victims = tuple(reference.victims(examples, candidate, cap))
        loss, asr, where = best_position(reference, InversionTask(candidate, victims), ids,
                                         Budget(None), CHUNK_ROWS)
        out.append(ReferenceTrigger(
            trigger_text=short.trigger_text, target_name=subject.labels[candidate.target],
            victim_names=[subject.labels[v] for v in candidate.victims],
            position=where.position, loss=short.loss, asr=short.asr, reference_loss=loss,
            reference_asr=asr,
            reference_rank=ranks.rank(short.trigger_text, candidate.target) if ranks else None))
    return out


def trigger_check(subject: Subject, examples: Sequence[Any], candidate: Candidate,
                  trigger: str, cap: int = 0,
                  seen: Sequence[Any] | None = None) -> tuple[float, float]:
    """Loss and attack success rate of a known ``trigger`` (text, as hard tokens) for
    ``candidate`` on its victims among ``examples`` as the model sees them (at most ``cap``,
    0: all), measured as a scan measures its inverted triggers: the subject's goal loss,
    averaged over the victims. ``seen``: ``subject.as_seen(examples)`` when the caller has
    it already (for an NER tagger a pass of the model over every example)."""
    ids = subject.token_ids(trigger)
    if not ids:
        raise InputError(f"the trigger {trigger!r} has no tokens")
    victims = subject.victims(subject.as_seen(examples) if seen is None else seen,
                              candidate, cap)
    if not victims:
        raise InputError(f"no example of the victim label(s) {list(candidate.victims)}")
    batch = subject.batch([candidate], [victims], len(ids))
    with torch.no_grad():
        loss, hit = subject.hard_check(batch, torch.tensor(ids, device=subject.device))
    return loss.mean().item(), hit.mean().item()


def patch_from_scan(subject: Subject, examples: Sequence[Any], result: ScanResult,
                    config: PatchConfig) -> SynthesisedPatch | None:
    """The image patch synthesised from ``result``'s best feature trigger (TIJO Section
    3.4) on the victims the inversion used, measured with its text trigger on the victims
    it did not use; None when the scan has no feature trigger."""
    best = result.best
    if best.feature_trigger is None or not isinstance(subject, VqaSubject):
        return None
    candidate = Candidate(tuple(best.victims), best.target, best.position)
    cap = int(result.config.get("max_victims", 0))
    support = subject.victims(examples, candidate, cap)
    used = {id(e) for e in support}
    held = [e for e in subject.victims(examples, candidate, 0) if id(e) not in used]
    vector = torch.tensor(best.feature_trigger)
    made = synthesise_and_measure(subject, candidate, support, held, best.trigger_ids,
                                  vector, config)
    measured = {f.name: getattr(made, f.name) for f in fields(made) if f.name != "patch"}
    return SynthesisedPatch(pixels=made.patch.pixels.tolist(), size=made.patch.size,
                            x=made.patch.x, y=made.patch.y, **measured)


def write_patch(result: ScanResult, path: Path) -> ScanResult:
    """Write ``result``'s synthesised patch as a PNG at ``path`` (atomically) and return the
    result with the patch's ``path`` set; a result without a patch is returned as it is."""
    if result.patch is None:
        return result
    write_image(torch.tensor(result.patch.pixels, dtype=torch.uint8), path)
    return replace(result, patch=replace(result.patch, path=str(path)))


def scan(model_dir: Path, examples: Path, config: ScanConfig | None = None,
         device: str = "cpu", allow_pickle: bool = False,
         progress: ProgressCallback | None = None, references: Sequence[Path] = (),
         reference_required: bool = True) -> ScanResult:
    """Scan the model in ``model_dir`` with the clean examples in the file ``examples``.

    ``references``: clean models of known tasks; the first with the model's labels (names,
    in order) is the reference its short triggers are measured on (the result's
    ``reference``). None matching is an :class:`InputError` when ``reference_required``,
    else the scan goes on without one. The result names the model (its directory and the
    SHA-256 of its weights). With ``config.patch``, a scan with a feature trigger also
    synthesises an image patch from it (:func:`patch_from_scan`; :func:`write_patch` saves
    it). Raises :class:`InputError` for bad input.
    """
    config = config or ScanConfig()
    model_dir = Path(model_dir)
    subject = load_subject(model_dir, device, allow_pickle, config.max_length)
    model = ModelRef(str(model_dir), weights_sha256(model_dir))
    rows = subject.read_examples(Path(examples))
    reference, where = None, None
    for path in map(Path, references):
        candidate = load_subject(path, device, allow_pickle, config.max_length)
        if list(candidate.labels) == list(subject.labels):
            reference, where = candidate, path
            break
    if references and reference is None and reference_required:
        raise InputError(f"no reference model has the labels {list(subject.labels)} of "
                         f"{model_dir}")
    result = scan_subject(subject, rows, config, progress, reference)
    result.model = model
    if config.patch is not None:
        if progress:
            progress(1, 1, "synthesising the image patch from the feature trigger")
        result.patch = patch_from_scan(subject, rows, result, config.patch)
    if result.reference is not None and where is not None:
        result.reference = replace(result.reference, path=str(where),
                                   weights_sha256=weights_sha256(where))
    return result
