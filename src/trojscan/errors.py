"""Errors that are the user's to fix.

An :class:`InputError` names one problem with what the user gave us (a spec, a model
directory, an examples file). The CLI prints its message on one line and exits with
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class InputError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""
