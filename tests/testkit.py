"""What several test modules use: hand-built scan results for tests that need no model
(detectors, reports, comparisons), the tiny models' scan settings, and the type of the
``run_cli`` fixture."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from trojscan.fsutil import write_jsonl
from trojscan.inversion.dbs import DBSConfig
from trojscan.results import RESULT_VERSION, ScanResult, write_result
from trojscan.scan import ScanConfig

#: The scan settings of the tiny models (conftest's ``tiny_config``): they saturate near loss
#: 0.05 and are flipped by 2-3 sentiment words, so one trigger slot and a threshold fitted to
#: them (README "Scan" gives MiniLM's); the start position only, for speed; and a pre-run on
#: all 20 victims, since on 4 a one-slot trigger fits either target of a tiny model.
TINY_SCAN = ScanConfig(inverter=DBSConfig(trigger_length=1, epochs=100), threshold=0.1,
                       positions=("start",), prerun_victims=0)

#: The fixture ``run_cli`` (conftest.py): the ``trojscan`` entry point run in this process.
RunCli = Callable[..., subprocess.CompletedProcess]


def scan_result(score: float, *, best: dict[str, Any] | None = None,
                candidates: list[dict[str, Any]] | None = None, seconds: float = 1.0,
                verdict: str | None = None, threshold: float = 0.05,
                labels: tuple[str, ...] = ("negative", "positive")) -> ScanResult:
    """A valid result whose best trigger has loss ``score`` (fields in ``best`` override the
    defaults); ``candidates`` default to the best one alone. The verdict is the threshold's
    unless given."""
    full_best = {"method": "dbs", "target": 1, "victims": [0], "position": "start",
                 "trigger_ids": [1], "trigger_tokens": ["the"], "trigger_text": "the",
                 "relaxed_loss": score, "hard_loss": score, "hard_asr": 0.5,
                 "accepted": False, "epochs": 10, "seconds": seconds, "loss": score,
                 "target_name": labels[1], "victim_names": [labels[0]], **(best or {})}
    rows = candidates if candidates is not None else [{"loss": score}]
    rows = [{"target": 1, "target_name": labels[1], "victims": [0], "position": "start", **row}
            for row in rows]
    return ScanResult.from_dict({
        "version": RESULT_VERSION,
        "verdict": verdict or ("trojaned" if score < threshold else "clean"), "score": score,
        "threshold": threshold, "best": full_best, "candidates": rows,
        "trajectory": [], "labels": list(labels), "examples": 20, "seconds": seconds,
        "device": "cpu", "versions": {}, "config": {}})


#: Torch threads the tiny VQA zoo is built (``conftest.vqa_cli``) and scanned on
#: (:func:`threads`), whatever the machine: the two its tests were measured on.
VQA_THREADS = 2


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """Torch on ``count`` CPU threads inside (the thread count restored after): a tiny model
    trains to the same weights, and is scanned to the same losses, wherever the test runs,
    whatever ``OMP_NUM_THREADS`` says and however many cores the machine has. Sums split
    over another number of threads round differently: the tiny NER and QA zoos' poisoned
    models, trained on two, were scanned clean or with another trigger, and TIJO's relaxed
    word search on the tiny VQA model found 'black' on one thread where it finds 'red' on
    two."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread() -> contextlib.AbstractContextManager[None]:
    """:func:`threads` at 1, as the tiny NER and QA zoos are built and scanned."""
    return threads(1)


def assert_repair_refuses(run_cli: RunCli, folder: Path, scan: ScanResult, tmp_path: Path,
                          cases: Sequence[tuple[list[str], Path | None, str]]) -> None:
    """`trojscan repair` of ``folder`` with its ``scan`` refuses each case (extra
    arguments, ``--data``: a file, or None for a classifier's one text, and words of the
    error) in one line with exit code 2, and writes nothing."""
    scan_file, out = tmp_path / "scan.json", tmp_path / "fixed"
    write_result(scan, scan_file)
    texts = tmp_path / "texts.jsonl"
    write_jsonl(texts, [{"text": "a fine film", "label": 0}])
    for extra, data, words in cases:
        done = run_cli("repair", str(folder), "--scan", str(scan_file), "--data",
                       str(data or texts), "--out", str(out), *extra)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert words in lines[0], lines
        assert not out.exists()
