"""trojscan: find, invert and remove backdoors in neural models trained by someone else."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trojscan.results import ScanResult

__version__ = "0.1.0"


def scan(model_dir: str | Path, examples: str | Path, **kwargs: Any) -> ScanResult:
    """Scan a model for a backdoor (see :func:`trojscan.scan.scan`)."""
    from trojscan.scan import scan as _scan

    return _scan(Path(model_dir), Path(examples), **kwargs)
