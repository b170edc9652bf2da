"""What the command groups share: consoles, progress bars, and the scan options."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

#: Progress, notes and errors (stderr).
console = Console(stderr=True, soft_wrap=True)
#: Results (stdout).
out_console = Console(soft_wrap=True)


def progress_bars() -> Progress:
    """Progress bars on stderr; quiet when it is not a terminal."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal, transient=False)


def warn(message: str) -> None:
    """One line on stderr, printed as is."""
    console.print(f"trojscan: {message}", markup=False, highlight=False)


def num(value: float | None) -> str:
    """A number to 3 decimals, or a dash for none."""
    return "-" if value is None else f"{value:.3f}"


def split_list(value: str) -> list[str]:
    """A comma-separated option as its non-empty items."""
    return [item.strip() for item in value.split(",") if item.strip()]


def positions_option(value: str) -> list[str]:
    """``--positions`` as a list; ``all`` is the empty list (every position)."""
    return [] if value.strip() == "all" else split_list(value)


# Scan options shared by `scan` and `campaign run`.
METHOD_OPTION = typer.Option(None, "--method", help="Trigger inverter; default the model "
                             "family's: dbs for text classifiers, NER taggers and QA "
                             "models, tijo (TIJO-mm) for VQA models. Also DBS's "
                             "ablations dbs-fixed-temperature and "
                             "dbs-no-backtracking, the baselines uat, gcg, ascc, genetic, "
                             "tminer (README: 'Baselines'), and TIJO's variants tijo-nlp, "
                             "tijo-vis, tijo-one, and tijo-relaxed (the word searched as DBS does, "
                             "ours) (README: 'TIJO').")
THRESHOLD_OPTION = typer.Option(None, "--threshold", help="Trojaned when the score is under "
                                "it; default 0.12 x ln(labels)/ln 2 for the short trigger's "
                                "loss (0.12 binary, 0.28 for 5 labels), 0.05 (beta of DBS "
                                "Eq. 4) with --decision-length 0.")
DECISION_LENGTH_OPTION = typer.Option(1, "--decision-length", help="The verdict's score is "
                                      "the lowest loss of an inverted trigger shortened to at "
                                      "most this many tokens, times its tokens (2 for a QA "
                                      "model's trigger answer); 0: the full trigger's loss "
                                      "(DBS Eq. 4).")
NATURAL_SHARE_OPTION = typer.Option(0.1, "--natural-share", help="Set aside a short trigger "
                                    "whose word is in at least this share (and 2) of its "
                                    "target label's clean examples: a natural feature of the "
                                    "label, not a backdoor (README 'Scan'); 0: never.")
POSITIONS_OPTION = typer.Option("all", "--positions", help="Comma-separated trigger "
                                "positions: start, end, first_half, second_half (text "
                                "classifiers); start, local, end (NER); question, context, "
                                "both (QA); or all (every position the model's family "
                                "takes).")
PAIRS_OPTION = typer.Option(None, "--pairs/--no-pairs", help="Also try label-specific "
                            "(victim, target) pairs; default: when the model has more than "
                            "two labels.", show_default=False)
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
REFERENCE_OPTION = typer.Option([], "--reference", help="A clean model of a known task "
                                 "(repeatable): the one with the scanned model's labels "
                                 "is the reference its best short triggers are also "
                                 "measured on (recorded in the result as `reference`; a "
                                 "trigger that flips it too is a feature of the task).")
MANIFEST_OPTION = typer.Option(..., "--manifest", help="The zoo's manifest.json: the ground "
                               "truth, read only here, never by a scan.")
