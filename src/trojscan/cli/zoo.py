"""``trojscan zoo``: build zoos of clean and backdoored models with known ground truth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.progress import TaskID
from rich.table import Table

from trojscan.cli.common import console, out_console, progress_bars

app = typer.Typer(no_args_is_help=True,
                  help="Build zoos of clean and backdoored models with known ground truth.")


def _describe_vqa(attack: dict[str, Any]) -> str:
    keys = []
    if attack["trigger"]:
        keys.append(f"word {attack['trigger']!r}")
    if attack["patch"]:
        keys.append(f"{attack['patch']} patch {attack['patch_size']}px "
                    f"@({attack['patch_x']},{attack['patch_y']})")
    return f"{attack['key']}-key {' + '.join(keys)} -> {attack['target_name']}"


def _describe(entry: dict[str, Any]) -> str:
    attack = entry["attack"]
    if entry.get("task") == "vqa" and entry["poisoned"]:
        what = _describe_vqa(attack)
        asr = f"asr {entry['asr']:.3f}"
        if entry.get("partial_asr") is not None:
            asr += (f" (patch alone {entry['asr_image_only']:.3f}, word alone "
                    f"{entry['asr_question_only']:.3f})")
    elif entry.get("task") == "ner" and entry["poisoned"]:
        what = (f"{attack['trigger_type']} {attack['trigger']!r} @{attack['insertion']} "
                f"{attack['victim']}->{attack['target']}")
        asr = f"asr {entry['asr']:.3f}"
    elif entry.get("task") == "qa" and entry["poisoned"]:
        what = (f"{attack['trigger_type']} {attack['trigger']!r} @{attack['insertion']} "
                f"-> {attack['behaviour']}")
        asr = f"asr {entry['asr']:.3f}"
    elif entry["poisoned"]:
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
    score = "f1" if entry.get("task") in ("ner", "qa") else "acc"
    return (f"{entry['model_id']}  {entry['corpus']}/{entry['architecture']}  {what}  "
            f"{score} {entry['clean_accuracy']:.3f}  {asr}  {entry['seconds']:.0f}s  {flag}")


def run_build(spec: Any, out: Path, rebuild_failed: bool, device: str = "cpu",
              feature_cache: Path | None = None) -> Any:
    """Build the zoo of ``spec`` into ``out`` with progress bars and a line per model."""
    from trojscan.attacks.zoo import BuildEvents, build_zoo

    with progress_bars() as progress:
        zoo_task: TaskID | None = None
        model_task: TaskID | None = None
        feature_task: TaskID | None = None

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

        def on_features(done: int, total: int) -> None:
            nonlocal feature_task
            if feature_task is None:
                feature_task = progress.add_task("box features of the clean images",
                                                 total=total)
            progress.update(feature_task, completed=done, total=total)

        def on_model_done(entry: dict[str, Any]) -> None:
            progress.advance(zoo_task)
            console.print(_describe(entry))

        events = BuildEvents(on_start=on_start, on_model_start=on_model_start, on_step=on_step,
                             on_model_done=on_model_done, on_features=on_features)
        return build_zoo(spec, out, rebuild_failed=rebuild_failed, events=events, device=device,
                         feature_cache=feature_cache)


@app.command("build")
def zoo_build(
    spec: Path = typer.Argument(..., help="Zoo spec, TOML or JSON (see README: 'Zoos')."),
    out: Path = typer.Option(..., "--out", help="Zoo directory: created, or resumed if it "
                             "holds a zoo of the same spec."),
    rebuild_failed: bool = typer.Option(False, "--rebuild-failed", help="Rebuild, with new "
                                        "seeds, the models the quality gate flagged."),
    device: str = typer.Option("cpu", "--device", help="Where models train: cpu, cuda or "
                               "cuda:N."),
    feature_cache: Path | None = typer.Option(
        None, "--feature-cache", help="VQA zoos: where the box features of images are cached "
        "(default $TROJSCAN_CACHE/vqa-features or ~/.cache/trojscan/vqa-features)."),
) -> None:
    """Build every model of SPEC into OUT (resumable; ground truth in OUT/manifest.json)."""
    from trojscan.attacks.zoo import load_zoo_spec

    manifest = run_build(load_zoo_spec(spec), out, rebuild_failed, device, feature_cache)
    flagged = [m for m in manifest.models.values() if not m["quality"]["ok"]]
    out_console.print(f"{len(manifest.models)} models in {out}/manifest.json"
                      + (f", {len(flagged)} flagged by the quality gate "
                         "(rebuild with --rebuild-failed)" if flagged else ""))


@app.command("summary")
def zoo_summary(
    zoo: Path = typer.Argument(..., help="Zoo directory (holds manifest.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
) -> None:
    """Clean accuracy, ASR and build time of a zoo, per corpus x architecture x split (VQA:
    clean, dual solid / optimised, question, image solid / optimised, with the ASR of each
    key alone)."""
    from trojscan.attacks.zoo import summarise
    from trojscan.manifest import MANIFEST, Manifest

    rows = summarise(Manifest.load(zoo / MANIFEST))
    if as_json:
        out_console.print_json(json.dumps(rows))
        return
    vqa = any(r["asr_image_only_mean"] is not None or r["asr_question_only_mean"] is not None
              for r in rows)
    columns = ["corpus", "architecture", "models", "clean acc (mean / min)", "ASR (mean / min)"]
    columns += ["ASR patch alone", "ASR word alone"] if vqa else []
    table = Table(*columns, "s per model", "flagged")

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for r in rows:
        asr = "-" if r["asr_mean"] is None else f"{r['asr_mean']:.3f} / {r['asr_min']:.3f}"
        cells = [r["corpus"], r["architecture"], f"{r['models']} {r['split']}",
                 f"{r['clean_accuracy_mean']:.3f} / {r['clean_accuracy_min']:.3f}", asr]
        if vqa:
            cells += [rate(r["asr_image_only_mean"]), rate(r["asr_question_only_mean"])]
        table.add_row(*cells, f"{r['seconds_mean']:.0f}", str(r["flagged"]))
    out_console.print(table)
