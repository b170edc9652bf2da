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


# Scan options shared by `scan` and `campaign run`.
METHOD_OPTION = typer.Option("dbs", "--method", help="Trigger inverter: dbs, its ablations "
                             "dbs-fixed-temperature and dbs-no-backtracking, or the baselines "
                             "uat, gcg, ascc, genetic, tminer (README: 'Baselines').")
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
MANIFEST_OPTION = typer.Option(..., "--manifest", help="The zoo's manifest.json: the ground "
                               "truth, read only here, never by a scan.")
