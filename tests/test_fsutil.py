"""Atomic writes: readers see the old file or the new one, and the new one gets the mode an
ordinary ``open`` gives (0o666 less the umask), not a temporary file's 0o600."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trojscan.fsutil import atomic_write_text


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_umask_mode(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "report.html", "<p>hi</p>")
    finally:
        os.umask(old)
    path = tmp_path / "report.html"
    assert path.read_text() == "<p>hi</p>" and path.stat().st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
