"""``trojscan trojai``: the TrojAI entry point (:mod:`trojscan.trojai`), with the option names
of usnistgov/trojai-example's ``entrypoint.py``. The evaluation harness calls ``infer``
without its name (``trojscan trojai --model_filepath ...``): :func:`legacy_argv` puts it
back."""

from __future__ import annotations

from pathlib import Path

import typer

from trojscan.cli.common import console, out_console, warn

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="The TrojAI detector interface: infer (one model -> one probability "
                       "of 'trojaned') and configure (fit the detector on labelled models). "
                       "`trojscan trojai --model_filepath ...` is `infer`, as the evaluation "
                       "harness calls it.")

METAPARAMETERS = typer.Option(..., "--metaparameters_filepath", help="metaparameters.json: "
                              "every knob (infer_*, train_*), validated against the schema.")
SCHEMA = typer.Option(..., "--schema_filepath", help="The metaparameters' JSON Schema.")
LEARNED = typer.Option(..., "--learned_parameters_dirpath", help="Folder of the fitted "
                       "detector (detector.json), written by configure.")
SCRATCH = typer.Option(..., "--scratch_dirpath", help="A folder for intermediate files.")


def legacy_argv(argv: list[str]) -> list[str]:
    """``argv`` with ``infer`` inserted after ``trojai`` when the harness's form (options
    straight after ``trojai``) is used."""
    if len(argv) > 2 and argv[1] == "trojai" and argv[2].startswith("--") \
            and argv[2] not in ("--help", "-h"):
        return [*argv[:2], "infer", *argv[2:]]
    return argv


@app.command("infer")
def infer_command(
    model_filepath: Path = typer.Option(..., "--model_filepath", help="The model: a Hugging "
                                        "Face directory (or its model.safetensors), a trojscan "
                                        "VQA directory, or a round's pickled model.pt (only "
                                        "with infer_allow_pickle: unpickling runs code the "
                                        "file's author chose)."),
    result_filepath: Path = typer.Option(..., "--result_filepath", help="Where the "
                                         "probability of 'trojaned' is written (one number)."),
    scratch_dirpath: Path = SCRATCH,
    examples_dirpath: Path = typer.Option(..., "--examples_dirpath", help="Clean examples: "
                                          "a folder with clean_examples.jsonl (trojscan's "
                                          "format) or class_K_example_N.txt files."),
    round_training_dataset_dirpath: Path | None = typer.Option(
        None, "--round_training_dataset_dirpath", help="The round's training models (unused "
        "by infer: configure fits on them)."),
    metaparameters_filepath: Path = METAPARAMETERS,
    schema_filepath: Path = SCHEMA,
    learned_parameters_dirpath: Path = LEARNED,
    tokenizer_filepath: Path | None = typer.Option(None, "--tokenizer_filepath", help="The "
                                                   "model's tokenizer (a folder, or a pickled "
                                                   ".pt with infer_allow_pickle); default: "
                                                   "the model's own folder."),
    source_dataset_dirpath: Path | None = typer.Option(None, "--source_dataset_dirpath",
                                                       help="The source dataset (unused)."),
) -> None:
    """Scan one model; write its probability of 'trojaned' to the result file. On failure
    nothing is written and the exit code is non-zero."""
    from trojscan.trojai import infer, read_metaparameters

    meta = read_metaparameters(metaparameters_filepath, schema_filepath)
    probability, result = infer(model_filepath, result_filepath, scratch_dirpath,
                                examples_dirpath, meta, learned_parameters_dirpath,
                                tokenizer_filepath, warn)
    best = result.best
    console.print(f"{result.verdict}: loss {result.score:.4f}, target {best.target_name}, "
                  f"trigger {best.trigger_text!r}", markup=False, highlight=False)
    out_console.print(f"{probability:.6f}")


@app.command("configure")
def configure_command(
    scratch_dirpath: Path = SCRATCH,
    configure_models_dirpath: Path = typer.Option(..., "--configure_models_dirpath",
                                                  help="Labelled models: a zoo (with its "
                                                  "manifest.json) or TrojAI model folders "
                                                  "with ground_truth.csv."),
    metaparameters_filepath: Path = METAPARAMETERS,
    schema_filepath: Path = SCHEMA,
    learned_parameters_dirpath: Path = LEARNED,
    automatic_configuration: bool = typer.Option(False, "--automatic_configuration",
                                                 help="Choose the detector kind by "
                                                 "cross-validated AUC instead of "
                                                 "train_detector."),
    tokenizers_dirpath: Path | None = typer.Option(None, "--tokenizers_dirpath", help="A "
                                                   "folder of tokenizers named after the "
                                                   "model folders (default: each model's "
                                                   "own)."),
) -> None:
    """Scan every labelled model and fit the detector infer reads (learned parameters)."""
    from trojscan.trojai import configure, read_metaparameters

    meta = read_metaparameters(metaparameters_filepath, schema_filepath)

    def progress(done: int, total: int, name: str) -> None:
        console.print(f"[{done + 1}/{total}] scanning {name}", markup=False, highlight=False)

    summary = configure(configure_models_dirpath, scratch_dirpath, meta,
                        learned_parameters_dirpath, automatic_configuration,
                        tokenizers_dirpath, progress)
    out_console.print(f"{summary['detector']} detector fitted on {summary['models']} models "
                      f"({summary['trojaned']} trojaned), training accuracy "
                      f"{summary['training_accuracy']:.3f} -> "
                      f"{learned_parameters_dirpath / 'detector.json'}")
