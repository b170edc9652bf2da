"""``trojscan scan``: scan one model for a backdoor."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from trojscan.cli.common import (
    ALLOW_PICKLE_OPTION,
    DECISION_LENGTH_OPTION,
    DEVICE_OPTION,
    EPOCHS_OPTION,
    MAX_VICTIMS_OPTION,
    METHOD_OPTION,
    NATURAL_SHARE_OPTION,
    PAIRS_OPTION,
    POSITIONS_OPTION,
    REFERENCE_OPTION,
    SEED_OPTION,
    THRESHOLD_OPTION,
    TRIGGER_LENGTH_OPTION,
    out_console,
    positions_option,
    progress_bars,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from trojscan.results import ScanResult
    from trojscan.scan import ScanConfig


def scan_with_progress(model_dir: Path, examples: Path, config: ScanConfig | None = None,
                       device: str = "cpu", allow_pickle: bool = False,
                       references: Sequence[Path] = ()) -> ScanResult:
    """:func:`trojscan.scan.scan` with a progress bar."""
    from trojscan.scan import scan

    with progress_bars() as progress:
        task = progress.add_task("scan", total=None)

        def on_progress(done: int, total: int, what: str) -> None:
            progress.update(task, completed=done, total=total, description=f"scan: {what}")

        return scan(model_dir, examples, config, device, allow_pickle, on_progress,
                    references)


#: A label counts as flipped by the trigger when at least this share of its examples is.
FLIPPED = 0.5


def print_verdict(result: ScanResult) -> None:
    """Verdict, target, trigger and time of a scan, on stdout."""
    best = result.best
    victims = ", ".join(best.victim_names)
    if result.detector is not None:
        basis = (f"probability {result.detector.probability:.3f} from the "
                 f"{result.detector.kind} detector; lowest inversion loss {result.score:.4f}")
    elif result.short_trigger is not None:
        length = result.short_trigger.length
        weighed = "" if length == 1 else f"score {result.score:.4f} = {length} x "
        basis = (f"{weighed}loss {result.short_trigger.loss:.4f} with {length} token(s) of "
                 f"the inverted trigger, threshold {result.threshold}")
    elif result.set_aside:
        basis = (f"every short trigger found is a natural feature of its label; score "
                 f"{result.score:.4f} = ln(labels), threshold {result.threshold}")
    else:
        basis = f"lowest inversion loss {result.score:.4f}, threshold {result.threshold}"
    out_console.print(f"verdict: [bold]{result.verdict.upper()}[/bold]  ({basis})")
    out_console.print(f"target:  {best.target_name}  (victims: {victims}; position "
                      f"{best.position})")
    if result.short_trigger is not None:
        short = result.short_trigger
        source = ("shortened from" if set(short.trigger_ids) <= set(best.trigger_ids)
                  else "found by the screen; DBS's trigger")
        out_console.print(f"trigger: {short.trigger_text!r}  loss {short.loss:.4f}, flips "
                          f"{short.asr:.0%} of the examples ({source} "
                          f"{best.trigger_text!r}, loss {best.hard_loss:.4f})")
    else:
        out_console.print(f"trigger: {best.trigger_text!r}  hard-token loss "
                          f"{best.hard_loss:.4f}, flips {best.hard_asr:.0%} of the examples")
    if result.flip_rates and len(result.flip_rates) > 1:
        flipped = [name for name, rate in result.flip_rates.items() if rate >= FLIPPED]
        reach = ("every label but the target: a universal trigger"
                 if len(flipped) == len(result.flip_rates)
                 else f"{', '.join(flipped) or 'no label'} only: label-specific")
        rates = ", ".join(f"{name} {rate:.0%}" for name, rate in result.flip_rates.items())
        out_console.print(f"flips:   {rates} ({reach})")
    for n in result.set_aside or []:
        ranked = ("" if n.reference_rank is None else
                  f"; the clean reference ranks it {n.reference_rank} of its vocabulary")
        out_console.print(f"set aside: {n.trigger_text!r} -> {n.target_name} (loss {n.loss:.4f},"
                          f" flips {n.asr:.0%}): in {n.examples} of the {n.of} clean "
                          f"{n.target_name} examples{ranked}: a natural feature of the label")
    if result.reference is not None:
        for t in result.reference.triggers:
            out_console.print(f"reference: {t.trigger_text!r} ({', '.join(t.victim_names)} -> "
                              f"{t.target_name}, {t.position}) flips {t.asr:.0%} here, "
                              f"{t.reference_asr:.0%} of the clean reference "
                              f"(loss {t.loss:.3f} / {t.reference_loss:.3f}"
                              + (f"; the reference ranks it {t.reference_rank} of its "
                                 f"vocabulary for {t.target_name}"
                                 if t.reference_rank is not None else "") + ")")
    if result.unseen:
        held = ", ".join(f"{name} ({count})" for name, count in result.unseen.items())
        out_console.print(f"not searched as victims: {held}: the model finds them in none of "
                          f"the examples (counted) that hold them; give examples where it does")
    if result.best.feature_norm is not None:
        out_console.print(f"feature trigger: norm {result.best.feature_norm:.2f} on "
                          f"{result.best.overlay} boxes; with the word it flips "
                          f"{result.best.hard_asr:.0%} of the examples (Inv-ASR)")
    if result.patch is not None:
        p = result.patch
        where = f"saved to {p.path}" if p.path else "give --out to save it"
        measured = "held-out" if p.held_out else "support (none held out)"
        out_console.print(f"patch:   {p.size}px at ({p.x}, {p.y}), {where}; with the word it "
                          f"flips {p.asr:.0%} of {p.questions} {measured} questions "
                          f"(patch alone {p.asr_patch_only:.0%}, word alone "
                          f"{p.asr_text_only:.0%})")
    out_console.print(f"seconds: {result.seconds:.1f} on {result.device}")


def scan_command(
    model_dir: Path = typer.Argument(..., help="Hugging Face model directory (sequence "
                                     "classifier, token classifier / NER tagger, extractive "
                                     "QA model), or a trojscan VQA model directory."),
    examples: Path | None = typer.Option(None, "--examples", help="Clean examples, JSON "
                                         'Lines of {"text", "label"} (label: index or name); '
                                         'for a VQA model {"image", "question", "answer"}; '
                                         'for an NER tagger {"tokens", "tags"}; for a QA '
                                         'model SQuAD\'s {"question", "context", "answers"} '
                                         "(default: MODEL_DIR/clean_examples.jsonl, the "
                                         "examples a zoo model or a repaired one ships "
                                         "with)."),
    out: Path | None = typer.Option(None, "--out", help="Write the full result record here "
                                    "(JSON, written atomically; checked before the scan)."),
    method: str | None = METHOD_OPTION,
    threshold: float | None = THRESHOLD_OPTION,
    positions: str = POSITIONS_OPTION,
    pairs: bool | None = PAIRS_OPTION,
    epochs: int | None = EPOCHS_OPTION,
    trigger_length: int | None = TRIGGER_LENGTH_OPTION,
    max_victims: int = MAX_VICTIMS_OPTION,
    seed: int = SEED_OPTION,
    decision_length: int = DECISION_LENGTH_OPTION,
    natural_share: float = NATURAL_SHARE_OPTION,
    device: str = DEVICE_OPTION,
    allow_pickle: bool = ALLOW_PICKLE_OPTION,
    reference: list[Path] = REFERENCE_OPTION,
    detector: Path | None = typer.Option(None, "--detector", help="A detector fitted by "
                                         "`trojscan campaign fit`: the verdict becomes its "
                                         "calibrated probability of 'trojaned' >= 0.5."),
    patch: bool = typer.Option(True, "--patch/--no-patch", help="VQA models: synthesise an "
                               "image patch from TIJO's feature trigger (TIJO Section 3.4), "
                               "measure it with the inverted word on held-out examples and, "
                               "with --out, save it as OUT's name + .patch.png."),
    patch_steps: int = typer.Option(150, "--patch-steps", help="Most optimisation steps of "
                                    "the patch synthesis (it stops earlier after 20 steps "
                                    "without progress); each is about 0.1 s per support "
                                    "image on 2 cores."),
) -> None:
    """Scan MODEL_DIR for a backdoor (DBS for text classifiers, NER taggers and QA models,
    TIJO for a VQA model, by default): verdict, target label and inverted trigger."""
    from dataclasses import replace

    from trojscan.detect import apply_detector, load_detector
    from trojscan.devices import check_device
    from trojscan.errors import InputError
    from trojscan.fsutil import check_writable
    from trojscan.inversion.tijo_patch import PatchConfig
    from trojscan.modeldir import EXAMPLES_FILE
    from trojscan.results import write_result
    from trojscan.scan import scan_config, write_patch
    from trojscan.subjects.loading import default_method

    def configure(name: str) -> ScanConfig:
        config = scan_config(name, threshold, positions_option(positions), pairs, epochs,
                             trigger_length, max_victims, seed, decision_length,
                             natural_share)
        try:
            return replace(config, patch=PatchConfig(max_steps=patch_steps) if patch else None)
        except ValueError as exc:
            raise InputError(f"--patch-steps: {exc}") from exc

    if method:  # bad options fail before anything is read
        config = configure(method)
    check_device(device)
    if examples is None:
        examples = model_dir / EXAMPLES_FILE
        if model_dir.is_dir() and not examples.is_file():  # else the loader names it
            raise InputError(f"{model_dir} has no {EXAMPLES_FILE}: give clean examples with "
                             "--examples")
    if out is not None:
        check_writable(out, "--out")
    fitted = load_detector(detector) if detector is not None else None  # fail before scanning
    if not method:  # the family's default: its config is the first thing read of the model
        config = configure(default_method(model_dir))
    result = scan_with_progress(model_dir, examples, config, device, allow_pickle, reference)
    if fitted is not None:
        result = apply_detector(result, fitted, detector)
    if out is not None:
        result = write_patch(result, out.with_name(out.stem + ".patch.png"))
    print_verdict(result)
    if out is not None:
        write_result(result, out)
