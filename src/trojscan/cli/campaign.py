"""``trojscan campaign``: scan whole zoos, fit a detector on known models, report."""

from __future__ import annotations

from pathlib import Path

import typer

from trojscan.cli.common import (
    ALLOW_PICKLE_OPTION,
    DECISION_LENGTH_OPTION,
    DEVICE_OPTION,
    EPOCHS_OPTION,
    MANIFEST_OPTION,
    MAX_VICTIMS_OPTION,
    METHOD_OPTION,
    NATURAL_SHARE_OPTION,
    PAIRS_OPTION,
    POSITIONS_OPTION,
    REFERENCE_OPTION,
    SEED_OPTION,
    THRESHOLD_OPTION,
    TRIGGER_LENGTH_OPTION,
    console,
    num,
    out_console,
    positions_option,
    progress_bars,
    split_list,
    warn,
)
from trojscan.errors import InputError

app = typer.Typer(no_args_is_help=True,
                  help="Scan whole zoos, fit a detector on known models, report.")


@app.command("run")
def campaign_run(
    zoo: Path = typer.Argument(..., help="A folder of model directories, each with its "
                               "clean_examples.jsonl (a zoo manifest is never read)."),
    out: Path = typer.Option(..., "--out", help="Results directory: one JSON file per model; "
                             "re-running resumes where it stopped."),
    method: str | None = METHOD_OPTION,
    workers: int = typer.Option(1, "--workers", help="Models scanned at once."),
    executor: str = typer.Option("local", "--executor", help="local (worker processes "
                                 "here) or ray (one Ray task per model)."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster to join (e.g. "
                                       "auto or ray://head:10001); default: start a local "
                                       "Ray runtime."),
    cpus_per_model: int = typer.Option(0, "--cpus-per-model", help="CPU threads per scan; "
                                       "0 = this machine's cores divided by --workers."),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="Scan again the models "
                                      "whose earlier scan failed."),
    models: str | None = typer.Option(None, "--models", help="Comma-separated model ids: "
                                      "scan only these (default: every model of ZOO)."),
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
    patch: bool = typer.Option(False, "--patch", help="VQA models: also synthesise an image "
                               "patch from each scan's feature trigger (TIJO Section 3.4; "
                               "about a minute per model on 2 cores), saved as "
                               "OUT/models/ID.patch.png."),
) -> None:
    """Scan every model of ZOO; a failed model is recorded with its error and the rest go on.
    Exit code 1 when some model failed (its error is in OUT/models/ID.error.json)."""
    from dataclasses import replace

    from trojscan.campaign.run import (
        CampaignConfig,
        discover,
        pending,
        result_path,
        run_campaign,
        select,
    )
    from trojscan.devices import check_device
    from trojscan.inversion.tijo_patch import PatchConfig
    from trojscan.scan import scan_config
    from trojscan.subjects.loading import default_method

    ids = discover(zoo)
    config = CampaignConfig(
        scan=replace(scan_config(method or default_method(zoo / ids[0]), threshold,
                                 positions_option(positions), pairs, epochs, trigger_length,
                                 max_victims, seed, decision_length, natural_share),
                     patch=PatchConfig() if patch else None),
        device=device if address else check_device(device),  # a cluster's GPUs are not here
        allow_pickle=allow_pickle, workers=workers,
        executor=executor, address=address, cpus_per_model=cpus_per_model,
        retry_errors=retry_errors, references=tuple(str(p) for p in reference))
    only = split_list(models) if models else None
    ids = select(ids, only)
    todo = len(pending(out, ids, retry_errors)) if out.is_dir() else len(ids)
    console.print(f"campaign {out}: {len(ids)} models, {len(ids) - todo} already done, "
                  f"{todo} to scan with {executor} x{workers}")
    with progress_bars() as progress:
        task = progress.add_task("campaign", total=len(ids), completed=len(ids) - todo)

        def on_model(model_id: str, status: str, done: int, total: int) -> None:
            progress.update(task, completed=done)
            where = result_path(out, model_id, error=status == "error")
            progress.console.print(f"{model_id}  {status}  {done}/{total}  -> {where}")

        counts = run_campaign(zoo, out, config, on_model, only)
    out_console.print(f"scanned {counts['scanned']}, errors {counts['errors']}, done earlier "
                      f"{counts['skipped']}, total {counts['total']}: results in {out}")
    if counts["errors"]:
        warn(f"{counts['errors']} of {counts['total']} models failed; their errors are in "
             f"{out}/models/*.error.json (rerun with --retry-errors to scan them again)")
        raise typer.Exit(1)


@app.command("fit")
def campaign_fit(
    results: Path = typer.Argument(..., help="Results directory of `trojscan campaign run`."),
    manifest: Path = MANIFEST_OPTION,
    out: Path = typer.Option(..., "--out", help="Where the detector is written (JSON)."),
    kind: str = typer.Option("threshold", "--kind", help="threshold (on the lowest loss) or "
                             "logistic (regression on inversion features)."),
) -> None:
    """Fit a detector on scanned models whose truth is known."""
    from trojscan.campaign.report import fit_detector
    from trojscan.detect import ThresholdDetector, save_detector

    detector, n, trojaned, accuracy = fit_detector(results, manifest, kind)
    save_detector(detector, out)
    extra = (f", threshold {detector.threshold:.4g} (binary units: x ln(labels)/ln 2 on a "
             "model with more labels)"
             if isinstance(detector, ThresholdDetector) else "")
    out_console.print(f"{kind} detector fitted on {n} models ({trojaned} trojaned){extra}; "
                      f"training accuracy {accuracy:.3f}; written to {out}")


@app.command("report")
def campaign_report(
    results: Path = typer.Argument(..., help="Results directory of `trojscan campaign run`."),
    manifest: Path = MANIFEST_OPTION,
    out: Path | None = typer.Option(None, "--out", help="Report folder (report.md, "
                                    "report.json, roc.png, report.html and a page per model "
                                    "in models/); default RESULTS/report."),
    kind: str = typer.Option("threshold", "--kind", help="Detector cross-validated: "
                             "threshold or logistic."),
    folds: int = typer.Option(5, "--folds", help="Stratified folds of the cross-validation."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffled folds and the split."),
    threshold: float | None = typer.Option(None, "--threshold", help="Re-decide every model "
                                           "at this loss; default: the scans' verdicts."),
    zoo: Path | None = typer.Option(None, "--zoo", help="The zoo's model folder: also "
                                    "measure each poisoned model's true trigger on the scan's "
                                    "examples, the search gap, and show each model's clean "
                                    "examples with and without its inverted trigger on its "
                                    "page (loads every model)."),
    device: str = DEVICE_OPTION,
    allow_pickle: bool = ALLOW_PICKLE_OPTION,
) -> None:
    """Accuracy, precision, recall, AUC, trigger recovery and seconds of a campaign (and, with
    --zoo, how far each scan was from its model's true trigger), as Markdown, JSON and an
    HTML page linking to a page per model."""
    from trojscan.campaign.report import evaluate, load_results, search_gaps, write_report
    from trojscan.manifest import load_truth
    from trojscan.reports.campaign_page import write_campaign_pages

    records, errors = load_results(results)
    truth = load_truth(manifest)
    gaps = search_gaps(zoo, records, truth, device, allow_pickle) if zoo is not None else None
    report = evaluate(records, truth, kind, folds, seed, threshold, errors, gaps)
    folder = out or results / "report"
    paths = write_report(report, folder)
    paths += write_campaign_pages(report, records, folder, zoo, device, allow_pickle)
    fixed = report["fixed"]
    out_console.print(
        f"{report['n']} models ({report['poisoned']} trojaned), {report['errors']} errors: "
        f"accuracy {fixed['accuracy']:.3f}, precision {num(fixed['precision'])}, recall "
        f"{num(fixed['recall'])}, AUC {num(report['roc_auc'])}, trigger recovered "
        f"{num(report['trigger_recovery']['recovered'])}, target right "
        f"{num(report['target_accuracy']['poisoned'])}, seconds/model mean "
        f"{report['seconds']['mean']:.1f} p95 {report['seconds']['p95']:.1f}")
    if report["search"]["measured"]:
        out_console.print(f"inverted at or below the true trigger's loss: "
                          f"{num(report['search']['searched'])} of "
                          f"{report['search']['measured']} poisoned models")
    out_console.print("report: " + ", ".join(str(p) for p in paths))


@app.command("weights")
def campaign_weights(
    zoo: Path = typer.Argument(..., help="The zoo's model folder."),
    manifest: Path = MANIFEST_OPTION,
    out: Path = typer.Option(..., "--out", help="Folder for weights.json and weights.md."),
    folds: int = typer.Option(5, "--folds", help="Stratified folds of the cross-validation."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffled folds."),
) -> None:
    """The weight-analysis baseline (TrojVQA, TIJO Table 2): a logistic regression on
    statistics of each model's output layer, cross-validated over all models, per split
    and per architecture; no scan needed."""
    from trojscan.campaign.weights import weight_analysis, write_weight_report
    from trojscan.manifest import load_truth

    report = weight_analysis(zoo, load_truth(manifest), folds, seed)
    paths = write_weight_report(report, out)
    splits = ", ".join(f"{k} {num(g['cv_auc'])}" for k, g in report["auc_by_split"].items())
    out_console.print(f"weight analysis over {report['all']['n']} models: cross-validated AUC "
                      f"{num(report['all']['cv_auc'])}; by split: {splits}")
    out_console.print("report: " + ", ".join(str(p) for p in paths))


@app.command("compare")
def campaign_compare(
    results: list[Path] = typer.Argument(..., help="Results directories of `trojscan "
                                         "campaign run` on the same zoo (say one per method)."),
    manifest: Path = MANIFEST_OPTION,
    out: Path = typer.Option(..., "--out", help="Folder for compare.md and compare.json."),
    names: str | None = typer.Option(None, "--names", help="Comma-separated column names, "
                                     "one per results directory; default: each campaign's "
                                     "method."),
    threshold: float | None = typer.Option(None, "--threshold", help="Re-decide every model "
                                           "at this score; default: the scans' verdicts."),
    all_models: bool = typer.Option(False, "--all-models", help="Count every model each run "
                                    "scanned; default: only the models every run scanned."),
    kind: str = typer.Option("threshold", "--kind", help="The detector cross-validated in "
                             "each attack split and architecture (rows a zoo with several "
                             "has, e.g. TIJO Table 2's for a VQA zoo): threshold or "
                             "logistic."),
) -> None:
    """Methods side by side, like DBS Tables 1 and 4 (and TIJO Table 2 on a VQA zoo): a
    column per results directory."""
    from trojscan.campaign.compare import compare, markdown, run_names, write_comparison
    from trojscan.manifest import load_truth

    columns = ([n.strip() for n in names.split(",")] if names is not None
               else run_names(results))
    if len(columns) != len(results):
        raise InputError(f"--names gives {len(columns)} names for {len(results)} results "
                         "directories")
    comparison = compare(list(zip(columns, results, strict=True)), load_truth(manifest),
                         threshold, common_only=not all_models, detector_kind=kind)
    paths = write_comparison(comparison, out)
    out_console.print(markdown(comparison))
    out_console.print("comparison: " + ", ".join(str(p) for p in paths))
