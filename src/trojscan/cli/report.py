"""``trojscan report``: the HTML page of one scan result."""

from __future__ import annotations

from pathlib import Path

import typer

from trojscan.cli.common import ALLOW_PICKLE_OPTION, DEVICE_OPTION, out_console


def report_command(
    result: Path = typer.Argument(..., help="A scan result (`trojscan scan --out`)."),
    out: Path = typer.Option(..., "--out", help="The HTML page to write (report.html)."),
    model: Path | None = typer.Option(None, "--model", help="The model directory the result "
                                      "is of (its weights must match): adds clean examples "
                                      "with and without the inverted trigger and the model's "
                                      "predictions."),
    examples: Path | None = typer.Option(None, "--examples", help="Clean examples for those "
                                         "(JSON Lines, as `trojscan scan` reads them); "
                                         "default MODEL/clean_examples.jsonl."),
    device: str = DEVICE_OPTION,
    allow_pickle: bool = ALLOW_PICKLE_OPTION,
) -> None:
    """One self-contained HTML page of a scan: verdict, trigger, examples, losses and the
    inversion's trajectory (no external requests)."""
    from trojscan.reports.scan_page import write_scan_report

    path = write_scan_report(result, out, model, examples, device, allow_pickle)
    out_console.print(f"report: {path}")
