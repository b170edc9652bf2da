"""``trojscan repair``: unlearn the backdoor a scan found."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from trojscan.cli.common import (
    ALLOW_PICKLE_OPTION,
    DEVICE_OPTION,
    SEED_OPTION,
    num,
    out_console,
    progress_bars,
    warn,
)


def _mean(values: list[float | None]) -> float | None:
    measured = [v for v in values if v is not None]
    return sum(measured) / len(measured) if measured else None


def _print_repair(report: dict[str, Any]) -> None:
    before, after = report["before"], report["after"]
    table = Table("held-out", "before", "after")
    metric = {"accuracy": "clean accuracy", "entity_f1": "clean entity F1",
              "f1": "clean F1 (SQuAD)"}[report["metric"]]
    table.add_row(metric, num(before["clean_accuracy"]), num(after["clean_accuracy"]))
    for u in report["unlearned"]:
        where = f", round {u['round']}" if u["round"] > 1 else ""
        table.add_row(f"ASR, {u['source']} trigger {u['trigger']!r} ({u['position']}{where})",
                      num(u["asr_before"]), num(u["asr_after"]))
    if report["neighbours"]:
        rows = report["neighbours"]
        table.add_row(f"ASR, {len(rows)} neighbour variants (mean)",
                      num(_mean([r["asr_before"] for r in rows])),
                      num(_mean([r["asr_after"] for r in rows])))
    if report["truth"] is not None and report["truth"]["trigger"] is not None:
        table.add_row(f"ASR, true trigger {report['truth']['trigger']!r}",
                      num(before["true_asr"]), num(after["true_asr"]))
    out_console.print(table)
    if before["inverted_asr"] is None or after["inverted_asr"] is None:
        out_console.print("(-: no held-out victim example was classified right without the "
                          "trigger, so there was nothing for it to flip)")
    data = report["data"]
    why = {"accuracy_guard": " (stopped early: accuracy fell past the margin)",
           "target_asr": " (stopped: every scan trigger's ASR reached the goal)",
           "epochs": ""}[report["stop"]]
    rounds = report["rounds"]
    epochs = sum(r["epochs"] for r in rounds)
    out_console.print(f"trained on {data['train']} examples ({data['stamped']} stamped), "
                      f"measured on {data['held_out']} held out; {len(rounds)} round"
                      f"{'s' if len(rounds) > 1 else ''}, {epochs} epochs; kept epoch "
                      f"{report['kept_epoch']} of the last round{why}"
                      f"; {report['seconds']:.0f}s on {report['device']}")
    for earlier, r in itertools.pairwise(rounds):
        why = " (clean, but a near miss at an unlearned target)" \
            if earlier.get("residual") else ""
        out_console.print(f"round {r['round']} unlearned what the re-scan found{why}: "
                          + (", ".join(map(repr, r["new_triggers"])) or "nothing new"))
    rescan = report["rescan"]
    if rescan is not None:
        found = "" if rescan["verdict"] == "clean" else \
            f", best trigger {rescan['short_trigger'] or rescan['trigger_text']!r}"
        if rounds[-1].get("residual"):
            found += (f"; a near miss at an unlearned target, {rescan['short_trigger']!r}: "
                      "more --rounds would unlearn it")
        out_console.print(f"re-scan of the repaired model: {rescan['verdict']} (score "
                          f"{rescan['score']:.4g}, threshold {rescan['threshold']:.4g}{found})")
    out_console.print(f"repaired model: {report['out_dir']}")


def repair_command(
    model_dir: Path = typer.Argument(..., help="The backdoored Hugging Face model directory "
                                     "(only read)."),
    scan_file: Path = typer.Option(..., "--scan", help="Its scan result (`trojscan scan "
                                   "--out`)."),
    data: Path = typer.Option(..., "--data", help="Clean labelled examples, JSON Lines as "
                              'a scan\'s: {"text", "label"} for a classifier, {"tokens", '
                              '"tags"} for an NER tagger, SQuAD\'s {"question", "context", '
                              '"answers"} for a QA model; --data-fraction of them are '
                              "trained on."),
    out: Path = typer.Option(..., "--out", help="The repaired model directory: new (or "
                             "empty), outside MODEL_DIR; written atomically."),
    report_file: Path | None = typer.Option(None, "--report", help="Also write the report "
                                            "(JSON) here; it is always in OUT/repair.json."),
    eval_data: Path | None = typer.Option(None, "--eval-data", help="Measure and guard on "
                                          "these examples instead of a held-out share of "
                                          "--data."),
    manifest: Path | None = typer.Option(None, "--manifest", help="A zoo manifest.json: "
                                         "also report the ASR of the model's true trigger."),
    model_id: str | None = typer.Option(None, "--model-id", help="The model's id in "
                                        "--manifest (default: MODEL_DIR's name)."),
    force: bool = typer.Option(False, "--force", help="Repair even when the scan's verdict "
                               "is clean (its best candidate is unlearned)."),
    data_fraction: float | None = typer.Option(None, "--data-fraction", help="Share of "
                                               "--data trained on, of what is not held out "
                                               "(default 1: all; the paper trains on 10 % "
                                               "of the training set)."),
    stamp_fraction: float | None = typer.Option(None, "--stamp-fraction", help="Share of "
                                                "the trained examples stamped with the inverted "
                                                "trigger, true label kept (default 0.2)."),
    eval_fraction: float | None = typer.Option(None, "--eval-fraction", help="Share of "
                                               "--data held out (default 0.2)."),
    repair_epochs: int | None = typer.Option(None, "--epochs", help="At most this many "
                                             "epochs (default 8)."),
    learning_rate: float | None = typer.Option(None, "--learning-rate", help="The first "
                                               "epoch's AdamW peak rate (default 3e-5, or "
                                               "1e-3 with --scope trigger-embeddings)."),
    rate_growth: float | None = typer.Option(None, "--rate-growth", help="After an epoch "
                                             "that left the scan triggers' ASR above "
                                             "--min-progress of what it was, "
                                             "multiply the rate by this (default 3; 1: a "
                                             "fixed rate)."),
    min_progress: float | None = typer.Option(None, "--min-progress", help="The ASR an "
                                              "epoch must reach, as a share of the one "
                                              "before it, to keep the rate (default 0.5)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Examples per step "
                                          "(default 32)."),
    max_accuracy_drop: float | None = typer.Option(None, "--max-accuracy-drop", help="Stop "
                                                   "when held-out accuracy (entity F1 for a "
                                                   "tagger, F1 for a QA model) falls more than "
                                                   "this many points (default 3)."),
    insertion: str | None = typer.Option(None, "--insertion", help="Where stamped examples "
                                         "carry the trigger: scan (the scan's position) or "
                                         "start, end, first_half, second_half, anywhere; "
                                         "for a tagger start, end, local, global; for a QA "
                                         "model question, context, both."),
    objective: str | None = typer.Option(None, "--objective", help="labels: cross-entropy "
                                         "with the true labels (the paper's Eq. 6); "
                                         "consistency: also keep the original model's "
                                         "outputs on the texts without the trigger "
                                         "(default consistency)."),
    consistency_weight: float | None = typer.Option(None, "--consistency-weight",
                                                    help="Weight of the consistency term "
                                                    "(default 1)."),
    max_triggers: int | None = typer.Option(None, "--max-triggers", help="Unlearn at most "
                                            "this many of the scan's triggers: best, deciding "
                                            "short one, other candidates under the threshold "
                                            "(default 4; 1 is the paper's)."),
    neighbours: int | None = typer.Option(None, "--neighbours", help="Also unlearn the "
                                          "deciding trigger with each token replaced by its "
                                          "this many nearest embeddings (default 4; 0: off)."),
    neighbour_share: float | None = typer.Option(None, "--neighbour-share", help="Share of "
                                                 "stamped examples carrying a neighbour "
                                                 "(default 0.5)."),
    target_asr: float | None = typer.Option(None, "--target-asr", help="Stop once every "
                                            "scan trigger's held-out ASR is at most this "
                                            "(default 0.02; negative: run every epoch)."),
    rounds: int | None = typer.Option(None, "--rounds", help="At most this many rounds: "
                                      "each unlearns what the scans so far found, then "
                                      "re-scans the repaired model; a clean re-scan ends "
                                      "the repair (default 3; 1: one round, then the "
                                      "re-scan's verdict)."),
    residual_factor: float | None = typer.Option(None, "--residual-factor", help="A clean "
                                                 "re-scan still leads to another round when "
                                                 "its trigger's target was unlearned and its "
                                                 "score is under this many times the "
                                                 "threshold (default 1.5; 1: the verdict "
                                                 "alone)."),
    no_rescan: bool = typer.Option(False, "--no-rescan", help="One round and no re-scan "
                                   "(the paper's; faster, but the report cannot say "
                                   "whether the repaired model scans clean)."),
    scope: str | None = typer.Option(None, "--scope", help="What trains: model (every "
                                     "weight), no-embeddings, or trigger-embeddings (only "
                                     "the embedding rows of the unlearned triggers' tokens) "
                                     "(default trigger-embeddings)."),
    base_model: Path | None = typer.Option(None, "--base-model", help="The public model "
                                           "MODEL_DIR was fine-tuned from (a directory with "
                                           "its model.safetensors, same vocabulary): also "
                                           "unlearn the tokens whose embeddings drifted with "
                                           "the found trigger's, the rest of a phrase "
                                           "trigger."),
    companion_gap: float | None = typer.Option(None, "--companion-gap", help="With "
                                               "--base-model, companions are the tokens "
                                               "above the first step of this many times in "
                                               "their drift along the trigger's (default "
                                               "1.4)."),
    max_companions: int | None = typer.Option(None, "--max-companions", help="With "
                                              "--base-model, at most this many companions "
                                              "per trigger token (default 4)."),
    composites: bool = typer.Option(True, "--composites/--no-composites", help="Also "
                                    "unlearn composites of what the scans found: the "
                                    "deciding trigger grown by one token of its inversion, "
                                    "and joined with an earlier round's at the same target "
                                    "(a trigger of two parts of which the scan found one)."),
    seed: int = SEED_OPTION,
    device: str = DEVICE_OPTION,
    allow_pickle: bool = ALLOW_PICKLE_OPTION,
) -> None:
    """Remove the backdoor a scan found in a text classifier, an NER tagger or an extractive
    QA model: fine-tune on clean data, part of it stamped with the inverted trigger and its
    true labels (DBS Eq. 6); print clean accuracy (entity F1, SQuAD F1) and ASR before and
    after; then re-scan the repaired model and, while the re-scan finds a backdoor, unlearn
    that too (--rounds).
    Exit code 1 when no epoch kept accuracy within the margin (the model with the smallest
    drop is written and the report says so) or the last re-scan still finds a backdoor."""
    from trojscan.devices import check_device
    from trojscan.repair import RepairConfig, read_scan, read_truth, repair

    knobs = {"data_fraction": data_fraction, "stamp_fraction": stamp_fraction,
             "eval_fraction": eval_fraction, "epochs": repair_epochs,
             "learning_rate": learning_rate, "batch_size": batch_size,
             "max_accuracy_drop": max_accuracy_drop, "insertion": insertion,
             "rate_growth": rate_growth, "min_progress": min_progress,
             "objective": objective,
             "consistency_weight": consistency_weight,
             "max_triggers": max_triggers, "neighbours": neighbours,
             "neighbour_share": neighbour_share, "target_asr": target_asr,
             "scope": scope, "rounds": 1 if no_rescan and rounds is None else rounds,
             "residual_factor": residual_factor,
             "companion_gap": companion_gap, "max_companions": max_companions}
    config = RepairConfig(seed=seed, rescan=not no_rescan, composites=composites,
                          **{k: v for k, v in knobs.items() if v is not None})
    check_device(device)
    result = read_scan(scan_file)
    truth = read_truth(manifest, model_id or model_dir.name) if manifest is not None else None
    with progress_bars() as progress:
        task = progress.add_task("repair", total=None)

        def on_progress(done: int, total: int, what: str) -> None:
            progress.update(task, completed=done, total=total, description=f"repair: {what}")

        report = repair(model_dir, result, data, out, config, force=force, truth=truth,
                        eval_data=eval_data, report_path=report_file, device=device,
                        allow_pickle=allow_pickle, progress=on_progress,
                        base_model=base_model)
    _print_repair(report)
    if not report["within_margin"]:
        warn(f"warning: clean {report['metric'].replace('_', ' ')} fell "
             f"{report['accuracy_drop_points']:.1f} points, more "
             f"than the margin of {config.max_accuracy_drop}; try a lower --learning-rate or "
             "more --data")
        raise typer.Exit(1)
    if report["rescan"] is not None and report["rescan"]["verdict"] != "clean":
        warn(f"warning: after {len(report['rounds'])} round(s) a re-scan still finds a "
             "backdoor; the repaired model is written: try more --rounds, or --scope model")
        raise typer.Exit(1)
