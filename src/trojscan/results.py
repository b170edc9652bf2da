"""The scan result: one typed, versioned record, read and written the same way everywhere.

A :class:`ScanResult` is what ``trojscan scan --out`` writes, what a campaign keeps per
model, what detectors, reports and repair read. It serialises to JSON with
:meth:`ScanResult.to_dict` (fields that are None are left out) and is read back, validated,
with :meth:`ScanResult.from_dict` / :func:`read_result`; a result of format version 1 (before
results named their model) still reads. The JSON Schema of the format is generated from the
dataclasses (:func:`json_schema`) and published with the package in
``trojscan/schemas/scan-result.schema.json`` (``trojscan schema scan`` prints it;
``python -m trojscan.results`` prints the generated one).

Format history: version 1 (trojscan 0.1.0); version 2 adds ``task`` and ``model`` (the
model directory and a SHA-256 of its weights); version 3 adds VQA scans: the feature
trigger of TIJO (``best.feature_trigger``, ``overlay``, ``feature_norm``; each candidate's
``feature_norm``) and the synthesised ``patch``; a version 3 result of a later trojscan
may also name the labels its examples hold that the model finds on none (``unseen``).
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from trojscan.errors import InputError
from trojscan.fsutil import atomic_write_text, read_json
from trojscan.modeldir import weights_sha256

RESULT_VERSION = 3
#: Format versions this trojscan reads.
READABLE_VERSIONS = (1, 2, 3)


def loss_unit(n_labels: int) -> float:
    """The uninformed cross-entropy ln(n_labels) in units of a binary model's ln 2 (1 for 2
    labels, 2.32 for 5): a trigger's loss competes with more labels on a model with more,
    so losses of models with different label counts compare once divided by it."""
    return math.log(max(n_labels, 2)) / math.log(2)


@dataclass
class BestTrigger:
    """The winning candidate's inversion.

    Attributes:
        method: the inverter that found it.
        target, victims, position: the candidate (label indices, trigger position).
        target_name, victim_names: the same labels by name.
        trigger_ids, trigger_tokens, trigger_text: the trigger as ids, tokens and text.
        relaxed_loss: its loss in the relaxation, at the temperature it was found at.
        hard_loss, hard_asr: its loss and attack success rate as hard tokens.
        accepted: whether it met the method's acceptance test.
        loss: the loss the scan ranked it by (relaxed if accepted, else hard).
        epochs, seconds: optimisation epochs and wall time of its run.
        feature_trigger, overlay, feature_norm: for a VQA scan by TIJO, the inverted
            feature trigger ``f_adv`` (a vector of the detector's feature size) added to the
            box features (``overlay``: ``all`` boxes or the top ``one``) together with the
            text trigger, and its L2 norm; the losses and ASR were measured with both.
    """

    method: str
    target: int
    victims: list[int]
    position: str
    trigger_ids: list[int]
    trigger_tokens: list[str]
    trigger_text: str
    relaxed_loss: float
    hard_loss: float
    hard_asr: float
    accepted: bool
    epochs: int
    seconds: float
    loss: float
    target_name: str
    victim_names: list[str]
    feature_trigger: list[float] | None = None
    overlay: str | None = None
    feature_norm: float | None = None


@dataclass
class ShortTrigger:
    """The best trigger of one length that shortening found inside an inverted trigger
    (:mod:`trojscan.inversion.shorten`): its token ids and text, hard-token loss and
    attack success rate on the candidate's victims."""

    length: int
    trigger_ids: list[int]
    trigger_text: str
    loss: float
    asr: float


@dataclass
class CandidateResult:
    """One candidate of the sweep. A fully inverted one has its losses, trigger and seconds
    (and, when the scan shortened it, ``shortened``: the best trigger of every length, from
    one token up); one the pre-selection dropped has only ``prerun_loss`` and ``full_run``
    false, and so has the position of a spread candidate where one of its short triggers did
    better than where its inverted trigger did best, with that trigger as ``shortened``.
    ``screened`` is the lone-token screen's best one-token trigger, when it ran;
    ``feature_norm`` the L2 norm of a TIJO scan's feature trigger for the candidate;
    ``refined_from`` the inverted trigger (with its hard loss) that a hard-token refinement
    replaced (``ScanConfig.answer_refine_epochs``), when one did."""

    target: int
    target_name: str
    victims: list[int]
    position: str
    loss: float | None = None
    relaxed_loss: float | None = None
    hard_loss: float | None = None
    hard_asr: float | None = None
    accepted: bool | None = None
    trigger_text: str | None = None
    seconds: float | None = None
    prerun_loss: float | None = None
    full_run: bool | None = None
    trigger_ids: list[int] | None = None
    shortened: list[ShortTrigger] | None = None
    screened: ShortTrigger | None = None
    feature_norm: float | None = None
    refined_from: ShortTrigger | None = None

    def short_triggers(self) -> list[ShortTrigger]:
        """Its shortened triggers and its screened one, those it has."""
        return [*(self.shortened or ()), *([self.screened] if self.screened else [])]


@dataclass
class ModelRef:
    """The model a result belongs to: its directory as given, and the SHA-256 of its weight
    files (:func:`trojscan.modeldir.weights_sha256`)."""

    path: str
    weights_sha256: str


@dataclass
class ReferenceTrigger:
    """One of the short triggers a verdict could rest on, measured on the scanned model and
    on a clean reference model of the same task (the trigger's text tokenised by the
    reference's tokenizer, the same examples, at the same position). ``reference_rank``:
    where the reference itself ranks the trigger's most target-like token alone as input,
    among its whole vocabulary, for the target (1 = the word it reads as most of the target
    label; None for a family without lone-token losses): a natural word of the task ranks
    high, a planted one anywhere."""

    trigger_text: str
    target_name: str
    victim_names: list[str]
    position: str
    loss: float
    asr: float
    reference_loss: float
    reference_asr: float
    reference_rank: int | None = None


@dataclass
class ReferenceCheck:
    """The clean reference model a scan measured its short triggers on, and those triggers
    (the best by their loss on the scanned model first). A trigger that flips the reference
    too is a feature of the task, not a backdoor of the model."""

    path: str
    weights_sha256: str
    triggers: list[ReferenceTrigger]


@dataclass
class NaturalTrigger:
    """A short trigger the verdict set aside as a natural feature of its target label: its
    text occurs in ``examples`` of the ``of`` clean examples of that label (a word the model
    learned from clean data of the label; a planted trigger is rare in clean text, or it
    would fire on it), or a clean reference of the task ranks it ``reference_rank``th of
    its vocabulary alone for the target (None: no reference, or not measured)."""

    trigger_text: str
    target_name: str
    loss: float
    asr: float
    examples: int
    of: int
    reference_rank: int | None = None


@dataclass
class SynthesisedPatch:
    """An image patch synthesised from a VQA scan's feature trigger (TIJO Section 3.4).

    Attributes:
        pixels: the patch, ``uint8`` values as [channel][row][column] (RGB).
        path: where its PNG was written (None: not written).
        size, x, y: its side and top-left corner in the model's input images (pixels).
        feature_loss: the final mean squared error between the patched support images' box
            features and the clean ones plus the feature trigger, on the boxes it covers.
        steps: optimisation steps run (early stopping may end it before the cap).
        asr: attack success rate of the patch with the inverted text trigger, as pixels
            through the detector, on held-out clean examples (victims the inversion did
            not use; all victims when there were none to hold out).
        asr_patch_only, asr_text_only: the same with only the patch, or only the text
            trigger.
        questions: how many examples the ASRs were measured on.
        held_out: whether those examples were held out of the inversion.
        seconds: wall time of the synthesis and its measurement.
    """

    pixels: list[list[list[int]]]
    size: int
    x: int
    y: int
    feature_loss: float
    steps: int
    asr: float
    asr_patch_only: float
    asr_text_only: float
    questions: int
    held_out: bool
    seconds: float
    path: str | None = None

    def png(self) -> bytes:
        """The patch encoded as PNG."""
        import torch

        from trojscan.vqa.images import png_bytes

        return png_bytes(torch.tensor(self.pixels, dtype=torch.uint8))


@dataclass
class DetectorVerdict:
    """A fitted detector's decision: its kind, probability of "trojaned", and file."""

    kind: str
    probability: float
    path: str | None = None


@dataclass
class ScanResult:
    """Everything a scan found about one model.

    Attributes:
        version: the format version (:data:`RESULT_VERSION` when written by this trojscan).
        verdict: ``trojaned`` or ``clean``: the lowest loss under ``threshold`` (DBS Eq. 4),
            or the detector's probability >= 0.5 when one decided.
        score: what the verdict compares with ``threshold``: the lowest loss times tokens
            of a trigger shortened to the scan's ``decision_length`` tokens (its
            ``answer_decision_length`` for a goal that is the trigger itself;
            ``short_trigger``) that is not a natural feature (``set_aside``; a one-token
            trigger's loss as it is; of those under ``threshold``, the shortest),
            ln(labels) (the loss of a model left at chance) when every one found is, or,
            with ``decision_length`` 0, the lowest inversion loss over the candidates (DBS
            Eq. 4).
        threshold: the verdict's threshold (beta of Eq. 4 for the full trigger's loss).
        best: the winning candidate's inversion (the candidate of ``short_trigger`` when
            short triggers decide; for a candidate the pre-run dropped, which has no
            inversion, its screened trigger, with method ``screen``; for the position a
            shortened trigger did best at, other than its inverted trigger's, that
            shortened trigger, with the scan's method).
        short_trigger: the short trigger (shortened, or found by the lone-token screen) the
            verdict rests on, when one does.
        candidates: every candidate of the sweep.
        trajectory: the best inversion's per-epoch loss, temperature and events.
        labels: the model's label names.
        examples: clean examples the scan had.
        seconds: wall time of the scan.
        device: where it ran.
        versions: trojscan, torch, transformers and Python versions.
        config: the scan settings (:class:`trojscan.scan.ScanConfig` as a dict).
        task: the model family's task (``text-classification``, ...).
        model: the model scanned (None in version 1 results).
        detector: the detector's decision, when one was applied.
        model_id: the model's id in a campaign.
        node: the id of the Ray node that scanned the model in a campaign run by Ray (as
            ``ray list nodes`` shows it); None elsewhere.
        reference: the short triggers measured on a clean reference model, when one was
            given (``--reference``); its ranks set triggers aside (``set_aside``).
        flip_rates: the short trigger's attack success rate on the examples of each label
            but the target (by label name), at the short trigger's position: every rate
            high, a universal backdoor; only its victims', a label-specific one.
        set_aside: the short triggers with a lower loss than ``short_trigger`` that the
            verdict set aside as natural features of their target label (the lowest loss
            first, one per trigger and target).
        patch: for a VQA scan, the image patch synthesised from the best feature trigger,
            when one was (``trojscan scan --patch``).
        unseen: labels the clean examples hold that the model itself finds on none of them
            (an NER type the tagger tags on none of its entities), by name, with how many
            examples hold them: no candidate has them as victims, so a backdoor that flips
            them was not searched for; None when there is none.
    """

    verdict: Literal["trojaned", "clean"]
    score: float
    threshold: float
    best: BestTrigger
    candidates: list[CandidateResult]
    trajectory: list[dict[str, Any]]
    labels: list[str]
    examples: int
    seconds: float
    device: str
    versions: dict[str, str]
    config: dict[str, Any]
    version: int = RESULT_VERSION
    task: str = "text-classification"
    model: ModelRef | None = None
    detector: DetectorVerdict | None = None
    model_id: str | None = None
    node: str | None = None
    short_trigger: ShortTrigger | None = None
    flip_rates: dict[str, float] | None = None
    reference: ReferenceCheck | None = None
    set_aside: list[NaturalTrigger] | None = None
    patch: SynthesisedPatch | None = None
    unseen: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; fields that are None (at any depth of the records above) are
        left out."""
        return _drop_none(asdict(self))

    def shortest(self, length: int) -> tuple[CandidateResult, ShortTrigger] | None:
        """The candidate whose trigger of ``length`` tokens (shortened, or found by the
        lone-token screen) has the lowest loss, with that trigger; None when there is
        none."""
        found = [(c, s) for c in self.candidates
                 for s in c.short_triggers()
                 if s.length == length]
        return min(found, key=lambda pair: pair[1].loss, default=None)

    def check_model(self, model_dir: Path) -> None:
        """Raise :class:`InputError` unless the weights in ``model_dir`` are those of the
        model this result is of (a version 1 result, which names no model, passes)."""
        if self.model is not None and self.model.weights_sha256 != weights_sha256(model_dir):
            raise InputError(f"the scan result is of another model ({self.model.path}, "
                             f"weights SHA-256 {self.model.weights_sha256[:12]}...), not of "
                             f"{model_dir}")

    @property
    def normalised_score(self) -> float:
        """``score`` divided by :func:`loss_unit` of the model's label count: the scale
        of the scan's own threshold (:meth:`trojscan.scan.ScanConfig.beta_for`), on which
        models with different label counts compare."""
        return self.score / loss_unit(len(self.labels))

    @classmethod
    def from_dict(cls, data: Any, where: str = "scan result") -> ScanResult:
        """Validate ``data`` (parsed JSON) as a result of a readable version; anything else
        is an :class:`InputError` naming ``where`` and the first problem."""
        from pydantic import ValidationError

        if not isinstance(data, dict):
            raise InputError(f"{where} is not a trojscan scan result (not a JSON object)")
        version = data.get("version")
        if version not in READABLE_VERSIONS:
            raise InputError(f"{where} has format version {version!r}; this trojscan reads "
                             f"versions {', '.join(map(str, READABLE_VERSIONS))}")
        try:
            return _adapter().validate_python(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            at = ".".join(str(p) for p in error["loc"]) or "(top)"
            raise InputError(f"{where} is not a valid scan result: {at}: {error['msg']}") from exc


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


@cache
def _adapter() -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(ScanResult)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a scan result, generated from :class:`ScanResult`."""
    schema = _adapter().json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def read_result(path: Path) -> ScanResult:
    """Read and validate the scan result at ``path``."""
    return ScanResult.from_dict(read_json(Path(path), "scan result"), f"scan result {path}")


def write_result(result: ScanResult, path: Path) -> None:
    """Write a scan result atomically; a failure is an :class:`InputError` naming the file
    (nothing is left half-written)."""
    try:
        atomic_write_text(Path(path), json.dumps(result.to_dict(), indent=2) + "\n")
    except OSError as exc:
        raise InputError(f"cannot write the result to {path}: "
                         f"{exc.strerror or exc}") from exc


def library_versions() -> dict[str, str]:
    """trojscan, torch, transformers and Python versions, for the record."""
    import torch
    import transformers

    return {"trojscan": metadata.version("trojscan"), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))
