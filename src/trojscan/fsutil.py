"""Small file-system helpers: atomic writes and JSON Lines."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trojscan.errors import InputError


def read_utf8(path: Path, what: str) -> str:
    """The text of ``path``; an unreadable or non-UTF-8 file is an :class:`InputError`
    naming it as ``what`` (e.g. "spec", "examples")."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path} is not UTF-8 (byte {exc.start})") from exc


def read_json(path: Path, what: str) -> Any:
    """The parsed JSON of ``path``; an unreadable, non-UTF-8 or malformed file is an
    :class:`InputError` naming it as ``what`` (e.g. "manifest", "detector")."""
    try:
        return json.loads(read_utf8(path, what))
    except ValueError as exc:
        raise InputError(f"{what} {path} is not valid JSON: {exc}") from exc


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    The data goes to a temporary file in the same directory, is flushed to disk, and is
    renamed over ``path`` (rename is atomic within one file system). The file gets the mode
    an ordinary ``open`` would give it (0o666 less the umask), not the temporary file's
    0o600, so that reports and results are readable by whoever may read the directory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (see :func:`atomic_write_text`)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line, atomically."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def check_writable(path: Path, what: str, directory: bool = False) -> None:
    """Raise :class:`InputError` unless ``path`` can be written: a file (or, with
    ``directory``, a directory) there would be created in its nearest existing ancestor,
    which must be a directory this process can create files in. Checked before long work,
    so that its result is not lost to a bad destination."""
    path = Path(path)
    if not directory and path.is_dir():
        raise InputError(f"{what} {path} is a directory; give a file name")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{what} {path} lies under {ancestor}, which is not a directory")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be written: {ancestor} is not writable "
                         f"({exc.strerror or exc})") from exc
