"""TIJO's lowest inversion loss on chosen VQA models under different settings of one knob.

    .venv/bin/python benchmarks/tijo_settings.py ZOO MODEL[,MODEL...] --knob feature_lr \
        --values 0.1,0.03,0.01 [--method tijo] [--threads 1] [--out results.json]

For every model and value: the scan of ``trojscan scan --method METHOD`` (a TIJO variant)
with that value of the ``TIJOConfig`` knob, and its three lowest candidates (loss, target,
word). The zoo manifest gives each model's split, word and target for the printout only; the
scan never sees it.
This is how the default ``feature_lr`` was chosen (README "TIJO").
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from trojscan.fsutil import atomic_write_json
from trojscan.manifest import MANIFEST, Manifest, split_of
from trojscan.modeldir import EXAMPLES_FILE
from trojscan.scan import scan_config, scan_subject
from trojscan.subjects.loading import load_subject


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo", type=Path)
    parser.add_argument("models")
    parser.add_argument("--knob", default="feature_lr")
    parser.add_argument("--values", default="0.1,0.03,0.01")
    parser.add_argument("--method", default="tijo")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    truth = Manifest.load(args.zoo / MANIFEST).models
    base = scan_config(args.method)
    kind = type(getattr(base.inverter, args.knob))
    rows = []
    for model_id in args.models.split(","):
        subject = load_subject(args.zoo / model_id)
        examples = subject.read_examples(args.zoo / model_id / EXAMPLES_FILE)
        entry = truth[model_id]
        for value in (kind(v) for v in args.values.split(",")):
            config = replace(base, inverter=replace(base.inverter, **{args.knob: value}))
            started = time.perf_counter()
            result = scan_subject(subject, examples, config)
            best = sorted((c.loss, c.target_name, c.trigger_text) for c in result.candidates
                          if c.loss is not None)[:3]
            row = {"model_id": model_id, "architecture": entry["architecture"],
                   "split": split_of(entry), "trigger": entry["attack"].get("trigger"),
                   "target": entry["attack"].get("target_name"), args.knob: value,
                   "lowest": [{"loss": loss, "target": t, "word": w} for loss, t, w in best],
                   "seconds": time.perf_counter() - started}
            rows.append(row)
            print(f"{model_id} {row['split']:<16} {row['trigger']} -> {row['target']} | "
                  f"{args.knob} {value} | "
                  + " ; ".join(f"{x['loss']:.3f} {x['target']} {x['word']!r}"
                               for x in row["lowest"]) + f"  {row['seconds']:.0f}s", flush=True)
    if args.out:
        atomic_write_json(args.out, {"method": args.method, "knob": args.knob,
                                     "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
