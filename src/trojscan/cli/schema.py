"""``trojscan schema scan|campaign``: print a published JSON Schema (package data)."""

from __future__ import annotations

from importlib import resources

import typer

from trojscan.errors import InputError

#: The published schemas (``trojscan/schemas/``) by the name the command takes.
SCHEMAS = {"scan": "scan-result.schema.json", "campaign": "campaign.schema.json"}


def schema_text(name: str) -> str:
    """The published JSON Schema ``name`` (``scan``: a scan result; ``campaign``: a
    campaign record, ``campaign.json``) as text; another name is an :class:`InputError`."""
    if name not in SCHEMAS:
        raise InputError(f"no schema {name!r}; expected one of {', '.join(SCHEMAS)}")
    return (resources.files("trojscan") / "schemas" / SCHEMAS[name]).read_text("utf-8")


def schema_command(
    name: str = typer.Argument(..., help="scan (a scan result, `trojscan scan --out`) or "
                               "campaign (a campaign record, RESULTS/campaign.json)."),
) -> None:
    """Print the JSON Schema of a scan result or a campaign record."""
    typer.echo(schema_text(name), nl=False)
