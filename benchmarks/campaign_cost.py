"""What a campaign costs: throughput with 1 and 2 local workers, and how the cost of a scan
grows with the number of labels and with the trigger length.

    .venv/bin/python benchmarks/campaign_cost.py runs/zoo-minilm [--models model-0001,...]
        [--epochs 40] [--out benchmarks/results/campaign_cost.json]

* ``workers``: ``trojscan campaign run`` over ``--models`` (default: four Rotten Tomatoes
  models) with ``--workers 1`` and then ``--workers 2`` (the cores divided among the
  workers), each into a fresh results folder; wall seconds, models per hour, and the ratio.
* ``scaling``: one Rotten Tomatoes model (2 labels) and one BBC model (5 labels) scanned with
  trigger lengths 5, 10 and 20: seconds, candidates, candidate-epochs run (every candidate
  for the pre-run, the kept ones for the rest) and seconds per candidate-epoch.

Every run uses ``--epochs`` (default 40, not the scan's 200) so that the figures come in
minutes; with patience off the work is proportional to epochs, and the full-scan seconds per
model are those of the campaign report. Run it alone on the machine: concurrent jobs share
the cores and distort every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from trojscan.inversion.dbs import DBSConfig
from trojscan.scan import ScanConfig, scan

TRIGGER_LENGTHS = (5, 10, 20)


def _workers(zoo: Path, models: list[str], epochs: int) -> dict[str, Any]:
    cli = Path(sys.executable).with_name("trojscan")
    runs: dict[str, Any] = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            subprocess.run([str(cli), "campaign", "run", str(zoo), "--out", tmp, "--models",
                            ",".join(models), "--workers", str(workers), "--epochs", str(epochs)],
                           check=True, capture_output=True)
            seconds = time.perf_counter() - started
            scanned = len(list((Path(tmp) / "models").glob("*.json")))
        runs[str(workers)] = {"seconds": round(seconds, 1), "models": scanned,
                              "models_per_hour": round(3600 * scanned / seconds, 1)}
        print("workers", workers, json.dumps(runs[str(workers)]), flush=True)
    return {"runs": runs, "throughput_ratio_2_vs_1": round(
        runs["2"]["models_per_hour"] / runs["1"]["models_per_hour"], 2)}


def _scaling(zoo: Path, manifest: dict[str, Any], epochs: int) -> list[dict[str, Any]]:
    rows = []
    for corpus in ("rotten_tomatoes", "bbc"):
        model_id = min(m for m, e in manifest.items() if e["corpus"] == corpus)
        for length in TRIGGER_LENGTHS:
            dbs = DBSConfig(epochs=epochs, trigger_length=length, patience=0)
            config = replace(ScanConfig(inverter=dbs), prerun_epochs=min(epochs, 20))
            result = scan(zoo / model_id, zoo / model_id / "clean_examples.jsonl", config)
            kept = sum(c.relaxed_loss is not None for c in result.candidates)
            dropped = len(result.candidates) - kept  # left the batched run after the pre-run
            candidate_epochs = dropped * config.prerun_epochs + kept * epochs
            rows.append({"model": model_id, "corpus": corpus, "labels": len(result.labels),
                         "trigger_length": length, "candidates": len(result.candidates),
                         "candidate_epochs": candidate_epochs,
                         "seconds": round(result.seconds, 1),
                         "seconds_per_candidate_epoch": round(
                             result.seconds / candidate_epochs, 3)})
            print("scaling", json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo", type=Path, help="a zoo built by `trojscan zoo build`")
    parser.add_argument("--models", default="", help="comma-separated model ids for the "
                        "workers run (default: the first four Rotten Tomatoes models)")
    parser.add_argument("--epochs", type=int, default=40, help="DBS epochs of every scan")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/campaign_cost.json"))
    args = parser.parse_args()
    manifest = json.loads((args.zoo / "manifest.json").read_text())["models"]
    models = args.models.split(",") if args.models else sorted(
        m for m, e in manifest.items() if e["corpus"] == "rotten_tomatoes")[:4]
    result = {"benchmark": "campaign throughput by workers; scan cost by labels and trigger "
                           "length", "zoo": str(args.zoo), "epochs": args.epochs,
              "cores": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "workers": _workers(args.zoo, models, args.epochs),
              "scaling": _scaling(args.zoo, manifest, args.epochs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
