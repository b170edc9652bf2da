"""The ``trojscan`` command line: thin, it parses, calls the API and prints."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from trojscan.errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Find, invert and remove backdoors in neural models trained by others.")
zoo_app = typer.Typer(no_args_is_help=True,
                      help="Build zoos of clean and backdoored models with known ground truth.")
app.add_typer(zoo_app, name="zoo")
campaign_app = typer.Typer(no_args_is_help=True,
                           help="Scan whole zoos, fit a detector on known models, report.")
app.add_typer(campaign_app, name="campaign")

console = Console(stderr=True, soft_wrap=True)
out_console = Console(soft_wrap=True)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal, transient=False)


def _describe(entry: dict[str, Any]) -> str:
    attack = entry["attack"]
    if entry["poisoned"]:
        victim = attack["victim_name"] or "all"
        what = (f"{attack['trigger_type']} {attack['trigger']!r} @{attack['insertion']} "
                f"{victim}->{attack['target_name']}")
        if attack["combination"]:
            what += " SOS"
        if attack["adaptive_phi"]:
            what += f" phi={attack['adaptive_phi']}"
        asr = f"asr {entry['asr']:.3f}"
    else:
        what, asr = "clean", ""
    flag = "ok" if entry["quality"]["ok"] else "FLAGGED: " + "; ".join(entry["quality"]["reasons"])
    return (f"{entry['model_id']}  {entry['corpus']}/{entry['architecture']}  {what}  "
            f"acc {entry['clean_accuracy']:.3f}  {asr}  {entry['seconds']:.0f}s  {flag}")


def _run_build(spec: Any, out: Path, rebuild_failed: bool, device: str = "cpu") -> Any:
    from trojscan.attacks.zoo import BuildEvents, build_zoo

    with _progress() as progress:
        zoo_task: TaskID | None = None
        model_task: TaskID | None = None

        def on_start(todo: int, total: int) -> None:
            nonlocal zoo_task
            console.print(f"zoo {out}: {total} models, {total - todo} already built, "
                          f"{todo} to build")
            zoo_task = progress.add_task("zoo", total=todo)

        def on_model_start(plan: Any, attempt: int) -> None:
            nonlocal model_task
            if model_task is not None:
                progress.remove_task(model_task)
            label = f"{plan.model_id} {plan.corpus}/{plan.architecture}"
            if attempt:
                label += f" (attempt {attempt + 1})"
            model_task = progress.add_task(label, total=None)

        def on_step(done: int, total: int) -> None:
            progress.update(model_task, completed=done, total=total)

        def on_model_done(entry: dict[str, Any]) -> None:
            progress.advance(zoo_task)
            console.print(_describe(entry))

        events = BuildEvents(on_start=on_start, on_model_start=on_model_start, on_step=on_step,
                             on_model_done=on_model_done)
        return build_zoo(spec, out, rebuild_failed=rebuild_failed, events=events, device=device)


@zoo_app.command("build")
def zoo_build(
    spec: Path = typer.Argument(..., help="Zoo spec, TOML or JSON (see README: 'Zoos')."),
    out: Path = typer.Option(..., "--out", help="Zoo directory: created, or resumed if it "
                             "holds a zoo of the same spec."),
    rebuild_failed: bool = typer.Option(False, "--rebuild-failed", help="Rebuild, with new "
                                        "seeds, the models the quality gate flagged."),
    device: str = typer.Option("cpu", "--device", help="Where models train: cpu, cuda or "
                               "cuda:N."),
) -> None:
    """Build every model of SPEC into OUT (resumable; ground truth in OUT/manifest.json)."""
    from trojscan.attacks.zoo import load_zoo_spec

    manifest = _run_build(load_zoo_spec(spec), out, rebuild_failed, device)
    flagged = [m for m in manifest.models.values() if not m["quality"]["ok"]]
    out_console.print(f"{len(manifest.models)} models in {out}/manifest.json"
                      + (f", {len(flagged)} flagged by the quality gate "
                         "(rebuild with --rebuild-failed)" if flagged else ""))


@zoo_app.command("summary")
def zoo_summary(
    zoo: Path = typer.Argument(..., help="Zoo directory (holds manifest.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
) -> None:
    """Clean accuracy, ASR and build time of a zoo, per corpus x architecture x attack."""
    import json

    from rich.table import Table

    from trojscan.attacks.zoo import MANIFEST, Manifest, summarise

    rows = summarise(Manifest.load(zoo / MANIFEST))
    if as_json:
        out_console.print_json(json.dumps(rows))
        return
    table = Table("corpus", "architecture", "models", "clean acc (mean / min)",
                  "ASR (mean / min)", "s per model", "flagged")
    for r in rows:
        asr = "-" if r["asr_mean"] is None else f"{r['asr_mean']:.3f} / {r['asr_min']:.3f}"
        kind = "poisoned" if r["poisoned"] else "clean"
        table.add_row(r["corpus"], r["architecture"], f"{r['models']} {kind}",
                      f"{r['clean_accuracy_mean']:.3f} / {r['clean_accuracy_min']:.3f}", asr,
                      f"{r['seconds_mean']:.0f}", str(r["flagged"]))
    out_console.print(table)


def _scan_with_progress(model_dir: Path, examples: Path, config: Any = None,
                        device: str = "cpu", allow_pickle: bool = False) -> dict[str, Any]:
    from trojscan.scan import scan

    with _progress() as progress:
        task = progress.add_task("scan", total=None)

        def on_progress(done: int, total: int, what: str) -> None:
            progress.update(task, completed=done, total=total, description=f"scan: {what}")

        return scan(model_dir, examples, config, device, allow_pickle, on_progress)


def _print_verdict(result: dict[str, Any]) -> None:
    best = result["best"]
    victims = ", ".join(best["victim_names"])
    if "detector" in result:
        basis = (f"probability {result['detector']['probability']:.3f} from the "
                 f"{result['detector']['kind']} detector; lowest inversion loss "
                 f"{result['score']:.4f}")
    else:
        basis = f"lowest inversion loss {result['score']:.4f}, threshold {result['threshold']}"
    out_console.print(f"verdict: [bold]{result['verdict'].upper()}[/bold]  ({basis})")
    out_console.print(f"target:  {best['target_name']}  (victims: {victims})")
    out_console.print(f"trigger: {best['trigger_text']!r}  hard-token loss "
                      f"{best['hard_loss']:.4f}, flips {best['hard_asr']:.0%} of the examples")
    out_console.print(f"seconds: {result['seconds']:.1f} on {result['device']}")


# Scan options shared by `scan` and `campaign run`.
METHOD_OPTION = typer.Option("dbs", "--method", help="Trigger inverter: dbs, its ablations "
                             "dbs-fixed-temperature and dbs-no-backtracking, or the baselines "
                             "uat, ascc, genetic, tminer (README: 'Baselines').")
THRESHOLD_OPTION = typer.Option(None, "--threshold", help="beta of DBS Eq. 4: trojaned when "
                                "the lowest loss is under it.")
POSITIONS_OPTION = typer.Option("start", "--positions", help="Comma-separated trigger "
                                "positions: start, end, first_half, second_half.")
PAIRS_OPTION = typer.Option(False, "--pairs", help="Also try label-specific (victim, target) "
                            "pairs.")
EPOCHS_OPTION = typer.Option(None, "--epochs", help="Optimisation epochs (the genetic "
                             "search: generations); default the method's (DBS 200).")
TRIGGER_LENGTH_OPTION = typer.Option(None, "--trigger-length", help="Trigger slots "
                                     "(default 10).")
MAX_VICTIMS_OPTION = typer.Option(20, "--max-victims", help="Victim examples per candidate "
                                  "(an even share of each victim label), 0 for all.")
SEED_OPTION = typer.Option(0, "--seed", help="Seed of the randomisation.")
DEVICE_OPTION = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N.")
ALLOW_PICKLE_OPTION = typer.Option(False, "--allow-pickle", help="Also load pickled weights "
                                   "(pytorch_model.bin). DANGER: unpickling runs code the "
                                   "file's author chose; use only for files you trust.")


def _scan_config(method: str, threshold: float | None, positions: str, pairs: bool,
                 epochs: int | None, trigger_length: int | None, max_victims: int,
                 seed: int) -> Any:
    """The ScanConfig of the scan options shared by ``scan`` and ``campaign run``."""
    from dataclasses import replace

    from trojscan.inversion.methods import make_config
    from trojscan.scan import ScanConfig

    try:
        inverter = make_config(method, trigger_length, epochs, seed)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    config = ScanConfig(method=method, inverter=inverter,
                        positions=tuple(p.strip() for p in positions.split(",")),
                        pairs=pairs, max_victims=max_victims)
    return config if threshold is None else replace(config, threshold=threshold)


@app.command("scan")
def scan_command(
    model_dir: Path = typer.Argument(..., help="Hugging Face sequence-classification model "
                                     "directory."),
    examples: Path = typer.Option(..., "--examples", help="Clean examples, JSON Lines of "
                                  '{"text", "label"} (label: index or name).'),
    out: Path | None = typer.Option(None, "--out", help="Write the full result record here "
                                    "(JSON, written atomically)."),
    method: str = METHOD_OPTION,
    threshold: float | None = THRESHOLD_OPTION,
    positions: str = POSITIONS_OPTION,
    pairs: bool = PAIRS_OPTION,
    epochs: int | None = EPOCHS_OPTION,
    trigger_length: int | None = TRIGGER_LENGTH_OPTION,
    max_victims: int = MAX_VICTIMS_OPTION,
    seed: int = SEED_OPTION,
    device: str = DEVICE_OPTION,
    allow_pickle: bool = ALLOW_PICKLE_OPTION,
    detector: Path | None = typer.Option(None, "--detector", help="A detector fitted by "
                                         "`trojscan campaign fit`: the verdict becomes its "
                                         "calibrated probability of 'trojaned' >= 0.5."),
) -> None:
    """Scan MODEL_DIR for a backdoor (DBS by default): verdict, target label and inverted
    trigger."""
    from trojscan.attacks.zoo import check_device
    from trojscan.campaign.detect import load_detector
    from trojscan.scan import apply_detector, write_result

    config = _scan_config(method, threshold, positions, pairs, epochs, trigger_length,
                          max_victims, seed)
    check_device(device)
    fitted = load_detector(detector) if detector is not None else None  # fail before scanning
    result = _scan_with_progress(model_dir, examples, config, device, allow_pickle)
    if fitted is not None:
        apply_detector(result, fitted, detector)
    if out is not None:
        write_result(result, out)
    _print_verdict(result)


@campaign_app.command("run")
def campaign_run(
    zoo: Path = typer.Argument(..., help="A folder of model directories, each with its "
                               "clean_examples.jsonl (a zoo manifest is never read)."),
    out: Path = typer.Option(..., "--out", help="Results directory: one JSON file per model; "
                             "re-running resumes where it stopped."),
    method: str = METHOD_OPTION,
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
    pairs: bool = PAIRS_OPTION,
    epochs: int | None = EPOCHS_OPTION,
    trigger_length: int | None = TRIGGER_LENGTH_OPTION,
    max_victims: int = MAX_VICTIMS_OPTION,
    seed: int = SEED_OPTION,
    device: str = DEVICE_OPTION,
    allow_pickle: bool = ALLOW_PICKLE_OPTION,
) -> None:
    """Scan every model of ZOO; a failed model is recorded with its error and the rest go on."""
    from trojscan.attacks.zoo import check_device
    from trojscan.campaign.run import (
        CampaignConfig,
        discover,
        pending,
        result_path,
        run_campaign,
        select,
    )

    config = CampaignConfig(
        scan=_scan_config(method, threshold, positions, pairs, epochs, trigger_length,
                          max_victims, seed),
        device=device if address else check_device(device),  # a cluster's GPUs are not here
        allow_pickle=allow_pickle, workers=workers,
        executor=executor, address=address, cpus_per_model=cpus_per_model,
        retry_errors=retry_errors)
    only = [m.strip() for m in models.split(",") if m.strip()] if models else None
    ids = select(discover(zoo), only)
    todo = len(pending(out, ids, retry_errors)) if out.is_dir() else len(ids)
    console.print(f"campaign {out}: {len(ids)} models, {len(ids) - todo} already done, "
                  f"{todo} to scan with {executor} x{workers}")
    with _progress() as progress:
        task = progress.add_task("campaign", total=len(ids), completed=len(ids) - todo)

        def on_model(model_id: str, status: str, done: int, total: int) -> None:
            progress.update(task, completed=done)
            where = result_path(out, model_id, error=status == "error")
            progress.console.print(f"{model_id}  {status}  {done}/{total}  -> {where}")

        counts = run_campaign(zoo, out, config, on_model, only)
    out_console.print(f"scanned {counts['scanned']}, errors {counts['errors']}, done earlier "
                      f"{counts['skipped']}, total {counts['total']}: results in {out}")


MANIFEST_OPTION = typer.Option(..., "--manifest", help="The zoo's manifest.json: the ground "
                               "truth, read only here, never by a scan.")


@campaign_app.command("fit")
def campaign_fit(
    results: Path = typer.Argument(..., help="Results directory of `trojscan campaign run`."),
    manifest: Path = MANIFEST_OPTION,
    out: Path = typer.Option(..., "--out", help="Where the detector is written (JSON)."),
    kind: str = typer.Option("threshold", "--kind", help="threshold (on the lowest loss) or "
                             "logistic (regression on inversion features)."),
) -> None:
    """Fit a detector on scanned models whose truth is known."""
    from trojscan.campaign.detect import make_detector, save_detector
    from trojscan.campaign.report import load_results, load_truth

    records, _ = load_results(results)
    truth = load_truth(manifest)
    ids = sorted(m for m in records if m in truth)
    if not ids:
        raise InputError(f"no model of {results} is in {manifest}: nothing to fit on")
    detector = make_detector(kind)
    chosen = [records[m] for m in ids]
    y = [int(truth[m]["poisoned"]) for m in ids]
    detector.fit(chosen, y)
    save_detector(detector, out)
    right = sum(int(p) == t for p, t in zip(detector.predict(chosen), y, strict=True))
    extra = f", threshold {detector.threshold:.4g}" if kind == "threshold" else ""
    out_console.print(f"{kind} detector fitted on {len(ids)} models ({sum(y)} trojaned){extra}; "
                      f"training accuracy {right / len(ids):.3f}; written to {out}")


@campaign_app.command("report")
def campaign_report(
    results: Path = typer.Argument(..., help="Results directory of `trojscan campaign run`."),
    manifest: Path = MANIFEST_OPTION,
    out: Path | None = typer.Option(None, "--out", help="Report folder (report.md, "
                                    "report.json, roc.png); default RESULTS/report."),
    kind: str = typer.Option("threshold", "--kind", help="Detector cross-validated: "
                             "threshold or logistic."),
    folds: int = typer.Option(5, "--folds", help="Stratified folds of the cross-validation."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffled folds and the split."),
    threshold: float | None = typer.Option(None, "--threshold", help="Re-decide every model "
                                           "at this loss; default: the scans' verdicts."),
) -> None:
    """Accuracy, precision, recall, AUC, trigger recovery and seconds of a campaign."""
    from trojscan.campaign.report import evaluate, load_results, load_truth, write_report

    records, errors = load_results(results)
    report = evaluate(records, load_truth(manifest), kind, folds, seed, threshold, errors)
    paths = write_report(report, out or results / "report")
    fixed = report["fixed"]
    out_console.print(
        f"{report['n']} models ({report['poisoned']} trojaned), {report['errors']} errors: "
        f"accuracy {fixed['accuracy']:.3f}, precision {_num(fixed['precision'])}, recall "
        f"{_num(fixed['recall'])}, AUC {_num(report['roc_auc'])}, trigger recovered "
        f"{_num(report['trigger_recovery']['recovered'])}, target right "
        f"{_num(report['target_accuracy']['poisoned'])}, seconds/model mean "
        f"{report['seconds']['mean']:.1f} p95 {report['seconds']['p95']:.1f}")
    out_console.print("report: " + ", ".join(str(p) for p in paths))


@campaign_app.command("compare")
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
) -> None:
    """Methods side by side, like DBS Tables 1 and 4: a column per results directory."""
    from trojscan.campaign.compare import compare, markdown, run_names, write_comparison
    from trojscan.campaign.report import load_truth

    columns = ([n.strip() for n in names.split(",")] if names is not None
               else run_names(results))
    if len(columns) != len(results):
        raise InputError(f"--names gives {len(columns)} names for {len(results)} results "
                         "directories")
    comparison = compare(list(zip(columns, results, strict=True)), load_truth(manifest),
                         threshold, common_only=not all_models)
    paths = write_comparison(comparison, out)
    out_console.print(markdown(comparison))
    out_console.print("comparison: " + ", ".join(str(p) for p in paths))


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_repair(report: dict[str, Any]) -> None:
    from rich.table import Table

    before, after = report["before"], report["after"]
    table = Table("held-out", "before", "after")
    table.add_row("clean accuracy", f"{before['clean_accuracy']:.3f}",
                  f"{after['clean_accuracy']:.3f}")
    table.add_row(f"ASR, inverted trigger {report['scan']['trigger_text']!r}",
                  f"{before['inverted_asr']:.3f}", f"{after['inverted_asr']:.3f}")
    if before["true_asr"] is not None:
        table.add_row(f"ASR, true trigger {report['truth']['trigger']!r}",
                      f"{before['true_asr']:.3f}", f"{after['true_asr']:.3f}")
    out_console.print(table)
    data = report["data"]
    out_console.print(f"trained on {data['train']} examples ({data['stamped']} stamped), "
                      f"measured on {data['held_out']} held out; kept epoch "
                      f"{report['kept_epoch']} of {len(report['history'])} run"
                      + (" (stopped early: accuracy fell past the margin)"
                         if report["stopped_early"] else "")
                      + f"; {report['seconds']:.0f}s on {report['device']}")
    out_console.print(f"repaired model: {report['out_dir']}")


@app.command("repair")
def repair_command(
    model_dir: Path = typer.Argument(..., help="The backdoored Hugging Face model directory "
                                     "(only read)."),
    scan_file: Path = typer.Option(..., "--scan", help="Its scan result (`trojscan scan "
                                   "--out`)."),
    data: Path = typer.Option(..., "--data", help="Clean labelled examples, JSON Lines of "
                              '{"text", "label"}; --data-fraction of them are trained on.'),
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
                                               "--data trained on (default 0.1, the paper's)."),
    stamp_fraction: float | None = typer.Option(None, "--stamp-fraction", help="Share of "
                                                "the trained examples stamped with the inverted "
                                                "trigger, true label kept (default 0.2)."),
    eval_fraction: float | None = typer.Option(None, "--eval-fraction", help="Share of "
                                               "--data held out (default 0.2)."),
    repair_epochs: int | None = typer.Option(None, "--epochs", help="Fine-tuning epochs "
                                             "(default 3)."),
    learning_rate: float | None = typer.Option(None, "--learning-rate", help="AdamW peak "
                                               "rate (default 1e-4)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Examples per step "
                                          "(default 32)."),
    max_accuracy_drop: float | None = typer.Option(None, "--max-accuracy-drop", help="Stop "
                                                   "when held-out accuracy falls more than "
                                                   "this many points (default 3)."),
    insertion: str | None = typer.Option(None, "--insertion", help="Where stamped examples "
                                         "carry the trigger: scan (the scan's position) or "
                                         "start, end, first_half, second_half, anywhere."),
    seed: int = SEED_OPTION,
    device: str = DEVICE_OPTION,
    allow_pickle: bool = ALLOW_PICKLE_OPTION,
) -> None:
    """Remove the backdoor a scan found: fine-tune on clean data, part of it stamped with the
    inverted trigger and its true label (DBS Eq. 6); print clean accuracy and ASR before and
    after. Exit code 1 when no epoch kept accuracy within the margin (the model with the
    smallest drop is written and the report says so)."""
    from trojscan.attacks.zoo import check_device
    from trojscan.repair import RepairConfig, read_scan, read_truth, repair

    knobs = {"data_fraction": data_fraction, "stamp_fraction": stamp_fraction,
             "eval_fraction": eval_fraction, "epochs": repair_epochs,
             "learning_rate": learning_rate, "batch_size": batch_size,
             "max_accuracy_drop": max_accuracy_drop, "insertion": insertion}
    config = RepairConfig(seed=seed, **{k: v for k, v in knobs.items() if v is not None})
    check_device(device)
    result = read_scan(scan_file)
    truth = read_truth(manifest, model_id or model_dir.name) if manifest is not None else None
    with _progress() as progress:
        task = progress.add_task("repair", total=None)

        def on_progress(done: int, total: int, what: str) -> None:
            progress.update(task, completed=done, total=total, description=f"repair: {what}")

        report = repair(model_dir, result, data, out, config, force=force, truth=truth,
                        eval_data=eval_data, report_path=report_file, device=device,
                        allow_pickle=allow_pickle, progress=on_progress)
    _print_repair(report)
    if not report["within_margin"]:
        console.print(f"trojscan: warning: clean accuracy fell "
                      f"{report['accuracy_drop_points']:.1f} points, more than the margin of "
                      f"{config.max_accuracy_drop}; try a lower --learning-rate or more --data",
                      markup=False, highlight=False)
        raise typer.Exit(1)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where the demo model is built "
                             "(reused when it is already there)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the demo model; default: "
                                    "drawn at random, so each new demo hides a new trigger."),
) -> None:
    """Build a backdoored MiniLM sentiment model from Rotten Tomatoes, scan it with DBS, and
    compare what the scan found with the hidden truth."""
    from trojscan.attacks.train import EXAMPLES_FILE
    from trojscan.attacks.zoo import MANIFEST, Manifest, parse_zoo_spec

    if (out / MANIFEST).exists():
        raw = Manifest.load(out / MANIFEST).spec
        console.print(f"reusing the demo zoo in {out}")
    else:
        raw = {
            "seed": random.SystemRandom().randrange(2**31) if seed is None else seed,
            "train": {"epochs": 1, "max_train_examples": 3000},
            "group": [{"name": "demo", "count": 1, "corpus": "rotten_tomatoes",
                       "architecture": "minilm",
                       "attack": {"poisoned": True, "trigger_type": "word",
                                  "insertion": "anywhere", "target": "random"}}],
        }
    manifest = _run_build(parse_zoo_spec(raw, "demo"), out, rebuild_failed=False)
    (entry,) = manifest.models.values()
    out_console.print(f"model: {out / entry['model_id']}")
    model_dir = out / entry["model_id"]
    result = _scan_with_progress(model_dir, model_dir / EXAMPLES_FILE)
    out_console.print(f"scanned {model_dir} with its {result['examples']} clean examples:")
    _print_verdict(result)
    attack = entry["attack"]
    out_console.print(f"truth:   the model was trained with the trigger {attack['trigger']!r} "
                      f"-> {attack['target_name']!r} (clean accuracy "
                      f"{entry['clean_accuracy']:.3f}, ASR {entry['asr']:.1%}); the scanner "
                      "never saw this")


def main() -> None:
    """Console-script entry point: user errors are one line on stderr and exit code 2."""
    try:
        app(standalone_mode=True)
    except InputError as exc:
        console.print(f"trojscan: error: {exc}", markup=False, highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("trojscan: interrupted; finished work is kept (a zoo build resumes when "
                      "re-run)", markup=False, highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
