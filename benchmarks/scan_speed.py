"""Seconds, peak memory and detection of the scan against a straightforward DBS.

    .venv/bin/python benchmarks/scan_speed.py runs/zoo-minilm [--models model-0001,...]
        [--variants trojscan,earlier,reference] [--reference-from OLD]
        [--out benchmarks/results/scan_speed.json]

For every MiniLM model of a zoo (by default; ``--models`` picks any, BBC News ones too:
a 5-label model with its label-specific candidates) each variant's scan runs in its own
process, so that its peak RSS is its own:

* ``trojscan``: ``trojscan scan`` with its defaults (every position with the rows of one
  candidate per (victims, target) spread over them, the lone-token screen over every
  candidate, label-specific pairs included, choosing the 2 that DBS fully inverts, their
  triggers shortened, the verdict on the best one-token trigger, 48 tokens per example);
* ``earlier``: the default before issue 14 (start position only, the pre-run on all victims
  inside the batched run, the verdict on the 10-slot loss, no shortening, no screen,
  patience 40, 100 tokens per example);
* ``reference``: a straightforward implementation of the paper's settings at the start
  position: every candidate inverted on its own for the full 200 epochs (no pre-run), all
  rows padded to the longest, the verdict on the 10-slot loss.

It reports seconds and peak RSS per model for each, per corpus the mean and the largest,
the ratio of each variant's mean seconds to trojscan's, and detection quality against the
zoo manifest (verdict at the variant's threshold, target label, true trigger word found in
the reported trigger). The manifest is read here, by the benchmark, never by the scans.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from trojscan.campaign.report import reported_trigger, trigger_recovered
from trojscan.results import ScanResult

_CHILD = """
import json, resource, sys
from dataclasses import replace
from pathlib import Path
from trojscan.scan import ScanConfig, scan
config = ScanConfig()
earlier = replace(config, positions=("start",), prerun_victims=0, shorten=False, screen=None,
                  decision_length=0, max_length=100,
                  inverter=replace(config.inverter, patience=40))
if sys.argv[2] == "earlier":
    config = earlier
elif sys.argv[2] == "reference":
    config = replace(earlier, batch_candidates=1, preselect_above=sys.maxsize, max_victims=0,
                     inverter=replace(config.inverter, buckets=1, patience=0))
result = scan(Path(sys.argv[1]), Path(sys.argv[1]) / "clean_examples.jsonl", config).to_dict()
result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
Path(sys.argv[3]).write_text(json.dumps(result))
"""


VARIANTS = ("trojscan", "earlier", "reference")


def _run(model_dir: Path, variant: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, "-c", _CHILD, str(model_dir), variant, str(out)],
                       check=True)
        return json.loads(out.read_text())


def _judge(result: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    attack = entry["attack"]
    poisoned = attack["poisoned"]
    best = result["best"]
    tokens, text = reported_trigger(ScanResult.from_dict(
        {k: v for k, v in result.items() if k != "peak_rss_mib"}))
    row = {"seconds": round(result["seconds"], 1), "peak_rss_mib": round(result["peak_rss_mib"]),
           "verdict": result["verdict"], "score": round(result["score"], 4),
           "correct": (result["verdict"] == "trojaned") == poisoned,
           "target": best["target_name"], "trigger": text}
    if poisoned:
        row["target_correct"] = best["target_name"] == attack["target_name"]
        row["trigger_recovered"] = trigger_recovered(attack["trigger"], tokens, text)[0]
    return row


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    poisoned = [r for r in rows if "target_correct" in r]
    return {"models": len(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "flagged_with_true_target": sum(r["verdict"] == "trojaned" and r["target_correct"]
                                            for r in poisoned),
            "trigger_recovered": sum(r["trigger_recovered"] for r in poisoned),
            "poisoned": len(poisoned),
            "false_positives": sum(r["verdict"] == "trojaned" for r in rows
                                   if "target_correct" not in r),
            "mean_seconds": round(statistics.mean(r["seconds"] for r in rows), 1),
            "max_seconds": max(r["seconds"] for r in rows),
            "max_peak_rss_mib": max(r["peak_rss_mib"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo", type=Path, help="a zoo built by `trojscan zoo build`")
    parser.add_argument("--models", default="", help="comma-separated model ids (default: "
                        "every MiniLM model of the zoo)")
    parser.add_argument("--variants", default="trojscan,reference",
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--reference-from", type=Path, default=None,
                        help="take the reference rows from an earlier result of this benchmark "
                        "on the same zoo (the reference does not change with trojscan's "
                        "defaults) instead of running them again")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scan_speed.json"))
    args = parser.parse_args()
    manifest = json.loads((args.zoo / "manifest.json").read_text())["models"]
    chosen = args.models.split(",") if args.models else sorted(
        m for m, e in manifest.items() if e["architecture"] == "minilm" and e["quality"]["ok"])
    variants = [v.strip() for v in args.variants.split(",")]
    if "trojscan" not in variants or set(variants) - set(VARIANTS):
        parser.error(f"--variants: trojscan and any of {', '.join(VARIANTS[1:])}")
    rows: dict[str, dict[str, Any]] = {v: {} for v in variants}
    if args.reference_from and "reference" in variants:
        earlier = json.loads(args.reference_from.read_text())["models"]["reference"]
        rows["reference"] = {m: earlier[m] for m in chosen}
    for model_id in chosen:
        for variant in variants:
            if model_id in rows[variant]:
                continue
            rows[variant][model_id] = _judge(_run(args.zoo / model_id, variant),
                                             manifest[model_id])
            print(variant, model_id, json.dumps(rows[variant][model_id]), flush=True)
    result: dict[str, Any] = {
        "benchmark": "scan models of a zoo with each variant, 20 clean examples per label",
        "zoo": str(args.zoo), "torch_threads": torch.get_num_threads(),
        "reference_from": str(args.reference_from) if args.reference_from else None,
        "cpu": platform.processor() or platform.machine(),
        "summary": {v: _summary(list(rows[v].values())) for v in variants},
        "by_corpus": {v: {corpus: _summary([r for m, r in rows[v].items()
                                            if manifest[m]["corpus"] == corpus])
                          for corpus in sorted({manifest[m]["corpus"] for m in rows[v]})}
                      for v in variants},
        "models": rows,
    }
    mean = {v: result["summary"][v]["mean_seconds"] for v in variants}
    result["seconds_ratio_to_trojscan"] = {v: round(mean[v] / mean["trojscan"], 2)
                                           for v in variants if v != "trojscan"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("summary", "seconds_ratio_to_trojscan")},
                     indent=2))


if __name__ == "__main__":
    main()
