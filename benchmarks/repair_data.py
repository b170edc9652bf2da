"""How much clean data repair needs: clean accuracy and true-trigger ASR before and after.

    .venv/bin/python benchmarks/repair_data.py [runs/zoo-minilm] [--results RESULTS_DIR]
        [--models model-0002,...] [--out benchmarks/results/repair.json]
        [--learning-rate 1e-4] [--epochs 3] [--insertion scan]

For every poisoned model of a zoo that passed its quality gate, the model is scanned with
its ``clean_examples.jsonl`` (or its scan is read from ``RESULTS_DIR``, a ``trojscan
campaign run`` results directory) and repaired (``trojscan.repair``) once per data size:

* ``train-10%``: 10 % of the corpus's training split (the paper's setting);
* ``train-2%``: 2 % of it;
* ``examples``: only the model's own clean examples (20 per label in the MiniLM zoo), all
  of them trained on.

Every repair is measured, and guarded, on the corpus's test split (at most 2,000 examples,
as the zoo measures its models), so the numbers compare with the paper's Table 2. ASR is the
repair report's: of the test examples of the victim label(s) the model classifies right
without the trigger, the share the trigger flips (the manifest's ``asr`` also counts the
victims the model gets wrong anyway). The true trigger comes from the manifest, which only
this benchmark reads. A model whose scan missed it (verdict clean) is repaired all the same
(``force``) and marked ``flagged: false``; ``trigger_recovered`` says whether the inverted
trigger holds a word of the true one (the campaign report's test), without which unlearning
it cannot be expected to remove the backdoor. Results, per model and averaged per data
size, go to ``--out``, rewritten (atomically) after every model; a re-run with the same
repair settings keeps the models already there and does the rest. Repaired models are
written to a temporary folder and deleted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from trojscan.campaign.report import trigger_recovered
from trojscan.campaign.run import result_path
from trojscan.corpora import load_corpus
from trojscan.fsutil import atomic_write_json, write_jsonl
from trojscan.inversion.dbs import DBSConfig
from trojscan.manifest import MANIFEST, load_truth
from trojscan.modeldir import EXAMPLES_FILE
from trojscan.repair import RepairConfig, read_scan, repair
from trojscan.results import ScanResult
from trojscan.scan import ScanConfig, scan

#: (name, data: "train" or "examples", data_fraction) of every repair of a model.
SIZES = (("train-10%", "train", 0.1), ("train-2%", "train", 0.02), ("examples", "examples", 1.0))


def _scan(model_dir: Path, model_id: str, results: Path | None, config: ScanConfig,
          ) -> ScanResult:
    if results is not None and result_path(results, model_id).is_file():
        return read_scan(result_path(results, model_id))
    return scan(model_dir, model_dir / EXAMPLES_FILE, config)


def _corpus_files(corpus_name: str, work: Path) -> tuple[Path, Path]:
    """The corpus's train and test splits as JSONL files (written once per corpus)."""
    corpus = load_corpus(corpus_name)
    paths = work / f"{corpus_name}-train.jsonl", work / f"{corpus_name}-test.jsonl"
    for path, split in zip(paths, (corpus.train, corpus.test), strict=True):
        if not path.exists():
            write_jsonl(path, ({"text": e.text, "label": e.label} for e in split))
    return paths


def _mean(rows: list[dict[str, Any]], when: str, key: str) -> float:
    return statistics.fmean(r[when][key] for r in rows)


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for name, _, _ in SIZES:
        done = [r["sizes"][name] for r in rows]
        out[name] = {
            "models": len(done),
            "flagged": sum(r["flagged"] for r in rows),
            "trigger_recovered": sum(r["trigger_recovered"] for r in rows),
            "train_examples_mean": statistics.fmean(d["train"] for d in done),
            "before": {"clean_accuracy": _mean(done, "before", "clean_accuracy"),
                       "true_asr": _mean(done, "before", "true_asr")},
            "after": {"clean_accuracy": _mean(done, "after", "clean_accuracy"),
                      "true_asr": _mean(done, "after", "true_asr"),
                      "inverted_asr": _mean(done, "after", "inverted_asr")},
            "within_margin": sum(d["within_margin"] for d in done),
            "true_asr_under_0.1": sum(d["after"]["true_asr"] < 0.1 for d in done),
        }
    return out


def run(zoo: Path, results: Path | None, only: list[str] | None, scan_config: ScanConfig,
        repair_config: RepairConfig, work: Path, out_path: Path) -> dict[str, Any]:
    """Scan (or read the scans of) and repair every poisoned model of ``zoo``; the results
    so far are written to ``out_path`` after every model, and the models already there
    (same repair settings) are not redone."""
    truth = load_truth(zoo / MANIFEST)
    ids = [m for m, e in sorted(truth.items()) if e["poisoned"] and (only is None or m in only)]
    done = _earlier(out_path, repair_config)
    rows = []
    for model_id in ids:
        if model_id in done:
            rows.append(done[model_id])
            continue
        entry, model_dir = truth[model_id], zoo / model_id
        result = _scan(model_dir, model_id, results, scan_config)
        train_file, test_file = _corpus_files(entry["corpus"], work)
        row: dict[str, Any] = {"model_id": model_id, "corpus": entry["corpus"],
                               "trigger": entry["attack"]["trigger"],
                               "insertion": entry["attack"]["insertion"],
                               "flagged": result.verdict == "trojaned",
                               "inverted_trigger": result.best.trigger_text,
                               "trigger_recovered": trigger_recovered(
                                   entry["attack"]["trigger"], result.best.trigger_tokens,
                                   result.best.trigger_text)[0],
                               "sizes": {}}
        for name, source, fraction in SIZES:
            data = train_file if source == "train" else model_dir / EXAMPLES_FILE
            report = repair(model_dir, result, data, work / "repaired" / f"{model_id}-{name}",
                            replace(repair_config, data_fraction=fraction), force=True,
                            truth=entry, eval_data=test_file)
            row["sizes"][name] = {k: report[k] for k in ("before", "after", "within_margin",
                                                         "stopped_early", "kept_epoch",
                                                         "seconds")}
            row["sizes"][name]["train"] = report["data"]["train"]
            after = report["after"]
            print(f"{model_id} {name}: acc {report['before']['clean_accuracy']:.3f} -> "
                  f"{after['clean_accuracy']:.3f}, true ASR {report['before']['true_asr']:.3f}"
                  f" -> {after['true_asr']:.3f} ({report['seconds']:.0f}s)", flush=True)
        rows.append(row)
        shutil.rmtree(work / "repaired", ignore_errors=True)
        atomic_write_json(out_path, _document(zoo, scan_config, repair_config, rows))
    if not rows:
        raise SystemExit(f"no poisoned model of {zoo} passed its quality gate")
    return _document(zoo, scan_config, repair_config, rows)


def _document(zoo: Path, scan_config: ScanConfig, repair_config: RepairConfig,
              rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"zoo": str(zoo), "sizes": [{"name": n, "data": s, "data_fraction": f}
                                       for n, s, f in SIZES],
            "scan_config": asdict(scan_config), "repair_config": asdict(repair_config),
            "summary": _summary(rows), "per_model": rows}


def _earlier(out_path: Path, repair_config: RepairConfig) -> dict[str, dict[str, Any]]:
    """The models an earlier run with the same repair settings already wrote to
    ``out_path`` (written after every model, so a killed run resumes)."""
    try:
        earlier = json.loads(out_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if earlier.get("repair_config") != json.loads(json.dumps(asdict(repair_config))):
        return {}
    return {row["model_id"]: row for row in earlier.get("per_model", [])}


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run, write the results and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("zoo", type=Path, nargs="?", default=Path("runs/zoo-minilm"))
    parser.add_argument("--results", type=Path, help="reuse the scans of this campaign "
                        "results directory where it has them")
    parser.add_argument("--models", help="comma-separated model ids (default: every "
                        "poisoned model)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/repair.json"))
    parser.add_argument("--scan-epochs", type=int, help="DBS epochs of the scans it runs")
    parser.add_argument("--trigger-length", type=int, help="trigger slots of its scans")
    parser.add_argument("--threshold", type=float, help="verdict threshold of its scans")
    parser.add_argument("--learning-rate", type=float, help="repair learning rate")
    parser.add_argument("--epochs", type=int, help="repair epochs")
    parser.add_argument("--insertion", help="where stamped examples carry the trigger (scan, "
                        "start, end, first_half, second_half, anywhere)")
    args = parser.parse_args(argv)
    dbs = DBSConfig()
    if args.scan_epochs is not None:
        dbs = replace(dbs, epochs=args.scan_epochs)
    if args.trigger_length is not None:
        dbs = replace(dbs, trigger_length=args.trigger_length)
    scan_config = ScanConfig(inverter=dbs)
    if args.threshold is not None:
        scan_config = replace(scan_config, threshold=args.threshold)
    knobs = {"learning_rate": args.learning_rate, "epochs": args.epochs,
             "insertion": args.insertion}
    repair_config = RepairConfig(**{k: v for k, v in knobs.items() if v is not None})
    only = args.models.split(",") if args.models else None
    with tempfile.TemporaryDirectory(prefix="repair-bench-") as work:
        out = run(args.zoo, args.results, only, scan_config, repair_config, Path(work),
                  args.out)
    print("\n| data | models | train examples | clean acc before -> after | "
          "true-trigger ASR before -> after |\n|---|---|---|---|---|")
    for name, s in out["summary"].items():
        print(f"| {name} | {s['models']} | {s['train_examples_mean']:.0f} | "
              f"{s['before']['clean_accuracy']:.3f} -> {s['after']['clean_accuracy']:.3f} | "
              f"{s['before']['true_asr']:.3f} -> {s['after']['true_asr']:.3f} |")
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
