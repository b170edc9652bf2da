"""A scan's lowest losses on chosen zoo models under different settings of one knob.

    .venv/bin/python benchmarks/scan_settings.py ZOO MODEL[,MODEL...] --knob prerun_epochs \
        --values 40,20,10 [--method dbs] [--threads 1] [--out results.json]

The knob is a field of ``ScanConfig`` (``prerun_epochs``, ``prerun_victims``, ``top_k``,
...) or, when ``ScanConfig`` has no such field, of the method's inverter config
(``feature_lr`` of TIJO, ``epochs`` of DBS, ...). For every model and value: the scan of
``trojscan scan --method METHOD`` with that value, the planted (victim -> target) pair's
rank among the candidates (by full-run loss, else pre-run loss), the three lowest
candidates and the seconds. The zoo manifest gives each model's split, trigger and target
for the printout only; the scan never sees it. This is how TIJO's ``feature_lr`` and the
NER pre-run were chosen (README "TIJO", "NER").
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, get_args, get_type_hints

import torch

from trojscan.fsutil import atomic_write_json
from trojscan.manifest import MANIFEST, Manifest, planted_trigger, split_of
from trojscan.modeldir import EXAMPLES_FILE
from trojscan.results import CandidateResult, ScanResult
from trojscan.scan import ScanConfig, scan_config, scan_subject
from trojscan.subjects.loading import load_subject


def with_knob(base: ScanConfig, knob: str, raw: str) -> ScanConfig:
    """``base`` with ``knob`` (a ScanConfig field, else an inverter field) set to ``raw``
    converted to the knob's type."""
    owner = base if knob in {f.name for f in fields(ScanConfig)} else base.inverter
    if not hasattr(owner, knob):
        raise SystemExit(f"no knob {knob!r} in ScanConfig or {type(base.inverter).__name__}")
    hint = get_type_hints(type(owner))[knob]  # e.g. ``int | None``: its first type
    kind = next((t for t in get_args(hint) if t is not type(None)), hint)
    value = kind(raw)
    if owner is base:
        return replace(base, **{knob: value})
    return replace(base, inverter=replace(base.inverter, **{knob: value}))


def ranked(result: ScanResult) -> list[CandidateResult]:
    """The candidates, lowest loss first (full-run loss, else the pre-run's)."""
    def key(c: CandidateResult) -> float:
        loss = c.loss if c.loss is not None else c.prerun_loss
        return float("inf") if loss is None else loss
    return sorted(result.candidates, key=key)


def planted_rank(entry: dict[str, Any], order: list[CandidateResult],
                 n_labels: int) -> int | None:
    """The 1-based rank in ``order`` of the first candidate with the planted target (and,
    for a label-specific attack, only planted victims); None for a clean model or when no
    candidate has it. A VQA attack is matched on its target answer alone."""
    if not entry["poisoned"]:
        return None
    if entry.get("task") == "vqa":
        target, victims = int(entry["attack"]["target"]), set(range(n_labels))
    else:
        planted = planted_trigger(entry, n_labels, str(entry.get("model_id")))
        assert planted is not None
        target, victims = planted.target, set(planted.victims)
    return next((i + 1 for i, c in enumerate(order)
                 if c.target == target and set(c.victims) <= victims), None)


def describe(c: CandidateResult, labels: list[str]) -> dict[str, Any]:
    """One candidate as a row of the printout."""
    loss = c.loss if c.loss is not None else c.prerun_loss
    return {"loss": loss, "full_run": c.loss is not None, "position": c.position,
            "victims": [labels[v] for v in c.victims], "target": c.target_name,
            "trigger": c.trigger_text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo", type=Path)
    parser.add_argument("models")
    parser.add_argument("--knob", default="prerun_epochs")
    parser.add_argument("--values", default="40,20,10")
    parser.add_argument("--method", default="dbs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    truth = Manifest.load(args.zoo / MANIFEST).models
    base = scan_config(args.method)
    rows = []
    for model_id in args.models.split(","):
        subject = load_subject(args.zoo / model_id)
        examples = subject.read_examples(args.zoo / model_id / EXAMPLES_FILE)
        entry = truth[model_id]
        for raw in args.values.split(","):
            config = with_knob(base, args.knob, raw)
            started = time.perf_counter()
            result = scan_subject(subject, examples, config)
            seconds = time.perf_counter() - started
            order = ranked(result)
            rank = planted_rank(entry, order, len(result.labels))
            row = {"model_id": model_id, "architecture": entry.get("architecture"),
                   "split": split_of(entry), "trigger": entry["attack"].get("trigger"),
                   "target": entry["attack"].get("target_name",
                                                 entry["attack"].get("target")),
                   "knob": args.knob, "value": raw, "verdict": result.verdict,
                   "score": result.score, "planted_rank": rank,
                   "candidates": len(order),
                   "lowest": [describe(c, result.labels) for c in order[:3]],
                   "seconds": seconds}
            rows.append(row)
            lowest = " ; ".join(
                f"{x['loss']:.3f} {','.join(x['victims'])}->{x['target']} {x['trigger']!r}"
                for x in row["lowest"] if x["loss"] is not None)
            print(f"{model_id} {row['split']:<10} {row['trigger']} -> {row['target']} | "
                  f"{args.knob} {raw} | {result.verdict} {result.score:.3f} | planted rank "
                  f"{rank}/{len(order)} | {lowest} | {seconds:.0f}s", flush=True)
    if args.out:
        atomic_write_json(args.out, {"method": args.method, "knob": args.knob,
                                     "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
