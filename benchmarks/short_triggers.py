"""How well short triggers separate backdoors from natural features, and how close each search
comes to the true trigger (issue 14, items 1 and 2).

For every model asked for, every method x trigger length asked for scans all candidates
(every target at every position asked for, no pre-selection) and records the lowest loss,
its target and trigger; the true trigger of a poisoned model (from the zoo manifest, read
here only) is measured as hard tokens at each position on the same examples. The summary
gives, per method and length: the ROC AUC of the lowest loss over the models, the poisoned
models whose scan reached the true trigger's loss, and seconds per model. Results are
written after every model and a re-run skips what is done.

    .venv/bin/python benchmarks/short_triggers.py runs/zoo-varied --models model-0024,... \
        --methods dbs,gcg --lengths 1,2 --positions start,end --out runs/short.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from sklearn.metrics import roc_auc_score

from trojscan.fsutil import atomic_write_json
from trojscan.inversion.base import make_config
from trojscan.manifest import MANIFEST, load_truth, planted_trigger
from trojscan.modeldir import EXAMPLES_FILE
from trojscan.scan import ScanConfig, scan_subject, trigger_check
from trojscan.subjects.base import Candidate
from trojscan.subjects.loading import load_subject


def _scan(subject: Any, examples: list[Any], method: str, length: int,
          positions: tuple[str, ...]) -> dict[str, Any]:
    config = ScanConfig(method=method, inverter=make_config(method, trigger_length=length),
                        positions=positions, preselect_above=10**6)
    result = scan_subject(subject, examples, config)
    return {"score": result.score, "target": result.best.target,
            "position": result.best.position, "trigger": result.best.trigger_text,
            "hard_asr": result.best.hard_asr, "seconds": round(result.seconds, 1),
            "candidates": [(c.target, c.position, c.loss) for c in result.candidates]}


def run(zoo: Path, models: list[str], methods: list[str], lengths: list[int],
        positions: tuple[str, ...], out: Path) -> dict[str, Any]:
    truth = load_truth(zoo / MANIFEST)
    done: dict[str, Any] = json.loads(out.read_text())["models"] if out.exists() else {}
    for model_id in models:
        entry = truth[model_id]
        row = done.setdefault(model_id, {"poisoned": entry["poisoned"], "scans": {}})
        subject = load_subject(zoo / model_id)
        examples = subject.read_examples(zoo / model_id / EXAMPLES_FILE)
        planted = planted_trigger(entry, len(subject.labels))
        if planted is not None and "true" not in row:
            row["true"] = {"trigger": planted.trigger, "target": planted.target,
                           "loss": {p: trigger_check(subject, examples, Candidate(
                               planted.victims, planted.target, p), planted.trigger, 20)[0]
                               for p in subject.positions}}
        for method in methods:
            for length in lengths:
                key = f"{method}-{length}"
                if key in row["scans"]:
                    continue
                started = time.perf_counter()
                row["scans"][key] = _scan(subject, examples, method, length, positions)
                print(model_id, key, row["scans"][key]["score"],
                      row["scans"][key]["trigger"], f"{time.perf_counter() - started:.0f}s",
                      flush=True)
                atomic_write_json(out, {"models": done, "summary": summarise(done)})
    return {"models": done, "summary": summarise(done)}


def summarise(done: dict[str, Any]) -> dict[str, Any]:
    keys = sorted({k for row in done.values() for k in row["scans"]})
    out = {}
    for key in keys:
        rows = [r for r in done.values() if key in r["scans"]]
        y = [int(r["poisoned"]) for r in rows]
        scores = [-r["scans"][key]["score"] for r in rows]
        poisoned = [r for r in rows if r["poisoned"]]
        reached = [r["scans"][key]["score"] <= min(r["true"]["loss"].values())
                   for r in poisoned]
        out[key] = {"models": len(rows),
                    "auc": roc_auc_score(y, scores) if len(set(y)) == 2 else None,
                    "clean_lowest": min((r["scans"][key]["score"] for r in rows
                                         if not r["poisoned"]), default=None),
                    "poisoned_highest": max((r["scans"][key]["score"] for r in poisoned),
                                            default=None),
                    "reached_true_loss": f"{sum(reached)} of {len(reached)}",
                    "seconds_mean": sum(r["scans"][key]["seconds"] for r in rows) / len(rows)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo", type=Path)
    parser.add_argument("--models", required=True)
    parser.add_argument("--methods", default="dbs,gcg")
    parser.add_argument("--lengths", default="1,2")
    parser.add_argument("--positions", default="start,end")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    result = run(args.zoo, args.models.split(","), args.methods.split(","),
                 [int(n) for n in args.lengths.split(",")], tuple(args.positions.split(",")),
                 args.out)
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
