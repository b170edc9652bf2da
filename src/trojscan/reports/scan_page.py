"""The HTML page of one scan (``trojscan report``): verdict and probability, target and
victims, the inverted trigger as tokens and text, clean examples with and without it (with
the model), the per-candidate losses as a table and a chart, the best inversion's loss and
temperature trajectory with its events, and for a VQA scan the synthesised patch beside a
clean image with it pasted in."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trojscan.errors import InputError
from trojscan.fsutil import check_writable
from trojscan.modeldir import EXAMPLES_FILE
from trojscan.reports.charts import candidate_name, loss_chart, png_data_url, trajectory_chart
from trojscan.reports.render import render, write_page
from trojscan.results import ScanResult, read_result
from trojscan.subjects.base import Candidate, Shown
from trojscan.subjects.loading import load_subject
from trojscan.subjects.vqa import VqaSubject
from trojscan.vqa.images import Patch, png_bytes, read_image

#: Clean examples a page shows with and without the trigger.
SHOWN_EXAMPLES = 5


@dataclass
class Evidence:
    """What a page shows from the model itself: its victims with and without ``trigger``
    (``shown``, from the examples file ``examples_from``) and, for a VQA model, a clean
    image of a victim (``clean_image``, ``uint8 [3, H, W]``)."""

    shown: list[Shown]
    examples_from: str
    trigger: str
    clean_image: torch.Tensor | None = field(default=None, repr=False)


def gather_evidence(result: ScanResult, model_dir: Path, examples: Path | None = None,
                    device: str = "cpu", allow_pickle: bool = False,
                    limit: int = SHOWN_EXAMPLES) -> Evidence:
    """Run the model of ``model_dir`` (which must be the one ``result`` is of) on up to
    ``limit`` victims of the best candidate from ``examples`` (default: the directory's
    clean examples), without and with the trigger the verdict rests on (the short trigger,
    else the full inverted one; :meth:`Subject.show`)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"model directory {model_dir} does not exist")
    result.check_model(model_dir)
    subject = load_subject(model_dir, device, allow_pickle,
                           int(result.config.get("max_length", 100)))
    if list(subject.labels) != result.labels:
        raise InputError(f"the scan result is of a model with labels {result.labels}, "
                         f"{model_dir} has {list(subject.labels)}")
    path = Path(examples) if examples is not None else model_dir / EXAMPLES_FILE
    rows = subject.read_examples(path)
    best = result.best
    candidate = Candidate(tuple(best.victims), best.target, best.position)
    short = result.short_trigger
    trigger = short.trigger_ids if short else best.trigger_ids
    shown = subject.show(rows, candidate, trigger, limit, best.feature_trigger)
    image = None
    if isinstance(subject, VqaSubject) and (victims := subject.victims(rows, candidate, 1)):
        image = read_image(victims[0].image)
    text = f"the {short.length}-token trigger {short.trigger_text!r} the verdict rests on" \
        if short else f"the inverted trigger {best.trigger_text!r}"
    return Evidence(shown, str(path), text, image)


def _images(result: ScanResult, evidence: Evidence | None) -> list[tuple[str, str]]:
    """(caption, data URL) of the patch, and of a clean image without and with it."""
    patch = result.patch
    if patch is None:
        return []
    images = [("synthesised patch", png_data_url(patch.png()))]
    if evidence is not None and evidence.clean_image is not None:
        clean = evidence.clean_image
        patched = Patch(torch.tensor(patch.pixels, dtype=torch.uint8), patch.x,
                        patch.y).apply(clean)
        images += [("a clean image", png_data_url(png_bytes(clean))),
                   ("the same image with the patch", png_data_url(png_bytes(patched)))]
    return images


def scan_page(result: ScanResult, evidence: Evidence | None = None,
              back: str | None = None) -> str:
    """The HTML page of ``result``; ``evidence`` from :func:`gather_evidence` adds the
    examples (and a VQA model's clean image); ``back`` links to a campaign page."""
    best = result.best
    best_row = next((c for c in result.candidates
                     if (c.target, c.victims, c.position) == (best.target, best.victims,
                                                              best.position)), None)
    candidates = [{"name": candidate_name(c, result.labels), "row": c, "best": c is best_row}
                  for c in result.candidates]
    name = result.model_id or (Path(result.model.path).name if result.model else None)
    if evidence is None:
        shown_note = "Give the model directory (--model) to see clean examples with and " \
                     "without the trigger."
    else:
        shown_note = f"No example of the victims in {evidence.examples_from}."
    run = [("method", best.method), ("examples", result.examples),
           ("seconds", f"{result.seconds:.1f}"), ("device", result.device),
           ("format version", result.version),
           *((f"{k} version", v) for k, v in sorted(result.versions.items()))]
    return render(
        "scan.html.j2", title=f"Scan report: {name}" if name else "Scan report", r=result,
        back=back, shown=evidence.shown if evidence else [], shown_note=shown_note,
        examples_from=evidence.examples_from if evidence else "",
        trigger=evidence.trigger if evidence else "",
        images=_images(result, evidence), candidates=candidates,
        loss_svg=loss_chart(result.candidates, result.labels, best_row),
        trajectory_svg=trajectory_chart(result.trajectory),
        events=sorted(Counter(s["event"] for s in result.trajectory if "event" in s).items()),
        set_aside=[(n.trigger_text, n.target_name, n.loss, n.asr, f"{n.examples}/{n.of}",
                    n.reference_rank) for n in result.set_aside or []],
        reference=[(t.trigger_text, t.target_name, t.loss, t.asr, t.reference_loss,
                    t.reference_asr, t.reference_rank)
                   for t in (result.reference.triggers if result.reference else [])],
        run=run)


def write_scan_report(result_path: Path, out: Path, model_dir: Path | None = None,
                      examples: Path | None = None, device: str = "cpu",
                      allow_pickle: bool = False) -> Path:
    """Read the scan result at ``result_path`` and write its page to ``out``: with
    ``model_dir`` (the model the result is of) its examples with and without the trigger.
    Bad input is an :class:`InputError` and leaves nothing written."""
    if examples is not None and model_dir is None:
        raise InputError("--examples needs --model: the examples are run through the model")
    check_writable(Path(out), "report")
    result = read_result(Path(result_path))
    evidence = None if model_dir is None else gather_evidence(result, model_dir, examples,
                                                              device, allow_pickle)
    write_page(Path(out), scan_page(result, evidence))
    return Path(out)
