"""What the report pages share: the Jinja2 environment (autoescaped, strict about missing
values) over the packaged templates, the number format, and the atomic page write."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from trojscan.errors import InputError
from trojscan.fsutil import atomic_write_text

#: The pages' Content-Security-Policy: nothing from outside the page, inline PNGs (``data:``
#: URLs) and inline styles only, no script, no form, no base URL.
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
       "form-action 'none'")


def num(value: Any, digits: int = 3) -> str:
    """A number for a table: ``digits`` decimals (tiny ones in e-notation), None as a dash,
    booleans as yes / no, anything else as text."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if value == 0 or abs(value) >= 10 ** -digits \
            else f"{value:.2e}"
    return str(value)


@cache
def environment() -> Environment:
    """The templates of ``trojscan/reports/templates``, autoescaped."""
    env = Environment(loader=PackageLoader("trojscan.reports", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = num
    env.globals["csp"] = Markup(CSP)
    return env


def render(template: str, **context: Any) -> str:
    """The page ``template`` rendered with ``context``."""
    return environment().get_template(template).render(**context)


def write_page(path: Path, html: str) -> None:
    """Write a page atomically; a failure is an :class:`InputError` naming the file."""
    try:
        atomic_write_text(Path(path), html)
    except OSError as exc:
        raise InputError(f"cannot write the report {path}: {exc.strerror or exc}") from exc
