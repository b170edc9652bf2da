"""The ``trojscan`` command line: thin, it parses, calls the library and prints.

One module per command group: :mod:`~trojscan.cli.zoo`, :mod:`~trojscan.cli.scan`,
:mod:`~trojscan.cli.campaign`, :mod:`~trojscan.cli.repair`, :mod:`~trojscan.cli.demo`,
:mod:`~trojscan.cli.trojai`, :mod:`~trojscan.cli.report`,
:mod:`~trojscan.cli.schema`.
"""

from __future__ import annotations

import sys

import typer

from trojscan.cli import campaign, demo, repair, report, scan, schema, trojai, zoo
from trojscan.cli.common import warn
from trojscan.errors import InputError

#: Exit code of a run stopped with Ctrl-C (128 + SIGINT), as typer gives it.
INTERRUPTED = 130

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Find, invert and remove backdoors in neural models trained by others.")
app.add_typer(zoo.app, name="zoo")
app.command("scan")(scan.scan_command)
app.add_typer(campaign.app, name="campaign")
app.command("repair")(repair.repair_command)
app.command("demo")(demo.demo)
app.add_typer(trojai.app, name="trojai")
app.command("report")(report.report_command)
app.command("schema")(schema.schema_command)


def main() -> None:
    """Console-script entry point: user errors are one line on stderr and exit code 2; a run
    stopped with Ctrl-C says what it kept and exits with 130."""
    sys.argv = trojai.legacy_argv(sys.argv)
    try:
        app(standalone_mode=True)
    except InputError as exc:
        warn(f"error: {exc}")
        sys.exit(2)
    except (SystemExit, KeyboardInterrupt) as exc:
        # typer turns Ctrl-C inside a command into exit code 130; one outside it (while
        # starting or stopping) arrives as it is.
        if isinstance(exc, KeyboardInterrupt) or exc.code == INTERRUPTED:
            warn("interrupted; finished work is kept and nothing is half-written (a zoo build "
                 "or a campaign resumes where it stopped when re-run)")
            sys.exit(INTERRUPTED)
        raise
