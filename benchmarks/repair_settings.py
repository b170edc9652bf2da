"""Repair settings compared on a zoo: clean accuracy and true-trigger ASR before and after.

    .venv/bin/python benchmarks/repair_settings.py [runs/zoo-repair] [--results RESULTS_DIR]
        [--models model-0000,...] [--runs paper,default,...] [--eval-examples N]
        [--out benchmarks/results/repair-settings.json]

Every poisoned model of the zoo (text classifiers, WNUT-16 NER taggers, whose clean
quality is entity F1 where the columns say accuracy, or QA models on WNUT-16's questions,
whose clean quality is SQuAD's F1) that passed its quality gate is
scanned with the default scan and its ``clean_examples.jsonl`` (or its scan is read from
``RESULTS_DIR``, a ``trojscan campaign run`` results directory), then repaired once per
named run of ``RUNS`` (``--runs`` picks some), each with 10 % of the corpus's training
split, the paper's amount ("We use 10% of the training data", Appendix A), measured and
guarded on the corpus's test split (at most ``--eval-examples``, 2,000), so the figures compare with
DBS Table 2:

* ``paper``: the paper's Eq. 6 as this project ran it before issue 19: cross-entropy with
  the true labels, the best inverted trigger only, 3 epochs at a fixed 1e-4, every weight,
  one round and no re-scan;
* ``default``: ``RepairConfig()``, today's defaults;
* the others change one default each (an ablation): ``labels`` (no consistency term),
  ``one-trigger`` (only the best inverted trigger), ``no-neighbours``, ``fixed-rate``
  (1e-4 every epoch), ``anywhere`` (stamped anywhere in the text, not where the scan
  inverted the trigger), ``model`` / ``no-embeddings`` (what trains: every weight, or all but
  the embeddings, instead of the triggers' embedding rows), ``one-round`` (one round of
  unlearning, then the re-scan's verdict, no further round),
  ``examples`` (only the model's own 20-per-label clean examples);
* ``companions``: the defaults without composites and, for a MiniLM model, the public
  MiniLM it was fine-tuned from as the base model (``--base-model``): the companions of the
  found trigger are unlearned too (a model of another family is repaired without one);
* ``composites``: ``companions`` with composites (the default since session 24): the
  composites of what the scans found are unlearned too
  (:mod:`trojscan.repair.composites`).

ASR is the repair report's: of the test examples of the victim label(s) the model classifies
right without the trigger, the share the trigger flips. The true trigger comes from the
manifest, which only this benchmark reads. A model whose scan missed it is repaired all the
same (``force``) and marked ``flagged: false``; ``trigger_recovered`` says whether the scan's
trigger holds a word of the true one. Every run but ``paper`` re-scans the model it repaired
(the repair's own re-scan: the scan's settings, the model's clean examples):
``rescan_verdict``, and ``rounds`` says how many rounds of unlearning it took.
Results, per model and per run, go to ``--out``, rewritten atomically after every repair;
a re-run keeps the (model, run) pairs already there with the same settings and does the
rest. Repaired models are written to a temporary folder and deleted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from trojscan.attacks.architectures import PRETRAINED, minilm_path
from trojscan.attacks.wnut import NAME as WNUT16
from trojscan.attacks.wnut import load_wnut16
from trojscan.attacks.wnut_qa import NAME as WNUT16_QA
from trojscan.attacks.wnut_qa import load_wnut16_qa
from trojscan.campaign.report import trigger_recovered
from trojscan.campaign.run import result_path
from trojscan.corpora import load_corpus
from trojscan.fsutil import atomic_write_json, write_jsonl
from trojscan.manifest import MANIFEST, load_truth
from trojscan.modeldir import EXAMPLES_FILE
from trojscan.repair import RepairConfig, read_scan, repair
from trojscan.results import ScanResult
from trojscan.scan import ScanConfig, scan

#: name -> (data: "train" (10 % of the training split) or "examples", settings changed).
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "paper": ("train", {"objective": "labels", "max_triggers": 1, "neighbours": 0,
                        "epochs": 3, "learning_rate": 1e-4, "rate_growth": 1.0,
                        "target_asr": -1.0, "scope": "model", "rescan": False,
                        "rounds": 1}),
    "default": ("train", {}),
    "labels": ("train", {"objective": "labels"}),
    "one-trigger": ("train", {"max_triggers": 1}),
    "no-neighbours": ("train", {"neighbours": 0}),
    "fixed-rate": ("train", {"learning_rate": 1e-4, "rate_growth": 1.0}),
    "anywhere": ("train", {"insertion": "anywhere"}),
    "model": ("train", {"scope": "model"}),
    "no-embeddings": ("train", {"scope": "no-embeddings"}),
    "one-round": ("train", {"rounds": 1}),
    "companions": ("train", {"composites": False}),
    "composites": ("train", {"composites": True}),
    "examples": ("examples", {}),
}
#: The runs that pass the public model a MiniLM model was fine-tuned from (``--base-model``).
BASE_RUNS = {"companions", "composites"}
#: The share of the training split a ``train`` run repairs with (the paper's).
TRAIN_SHARE = 0.1


def _scan(model_dir: Path, model_id: str, results: Path | None) -> ScanResult:
    if results is not None and result_path(results, model_id).is_file():
        return read_scan(result_path(results, model_id))
    return scan(model_dir, model_dir / EXAMPLES_FILE, ScanConfig())


def _corpus_files(corpus_name: str, work: Path) -> tuple[Path, Path]:
    """The corpus's train and test splits as JSONL files (written once per corpus): texts
    and labels, for WNUT-16 (the NER zoos) words and tags, for its QA set (the QA zoos)
    questions in SQuAD's form."""
    paths = work / f"{corpus_name}-train.jsonl", work / f"{corpus_name}-test.jsonl"
    splits: tuple[list[dict[str, Any]], ...]
    if corpus_name == WNUT16_QA:
        asked = load_wnut16_qa()
        splits = tuple([item.to_squad() for item in split] for split in (asked.train,
                                                                         asked.test))
    elif corpus_name == WNUT16:
        tagged = load_wnut16()
        splits = tuple(
            [{"tokens": list(s.tokens), "tags": list(s.tags)} for s in split]
            for split in (tagged.train, tagged.test))
    else:
        corpus = load_corpus(corpus_name)
        splits = tuple([{"text": e.text, "label": e.label} for e in split]
                       for split in (corpus.train, corpus.test))
    for path, rows in zip(paths, splits, strict=True):
        if not path.exists():
            write_jsonl(path, rows)
    return paths


def _config(name: str, eval_examples: int) -> RepairConfig:
    source, changes = RUNS[name]
    share = TRAIN_SHARE if source == "train" else 1.0
    return replace(RepairConfig(), data_fraction=share, max_eval_examples=eval_examples,
                   **changes)


def _summary(rows: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    out = {}
    for name in names:
        done = [r["runs"][name] for r in rows if name in r["runs"]]
        if not done:
            continue

        def mean(when: str, key: str, done: list[dict[str, Any]] = done) -> float:
            return statistics.fmean(d[when][key] for d in done)

        out[name] = {
            "models": len(done),
            "train_examples_mean": statistics.fmean(d["train"] for d in done),
            "before": {"clean_accuracy": mean("before", "clean_accuracy"),
                       "true_asr": mean("before", "true_asr")},
            "after": {"clean_accuracy": mean("after", "clean_accuracy"),
                      "true_asr": mean("after", "true_asr")},
            "accuracy_drop_points": statistics.fmean(d["accuracy_drop_points"] for d in done),
            "within_margin": sum(d["within_margin"] for d in done),
            "true_asr_at_most_0.05": sum(d["after"]["true_asr"] <= 0.05 for d in done),
            "rescan_clean": sum(d.get("rescan_verdict") == "clean" for d in done),
            "rounds_mean": statistics.fmean(len(d.get("rounds", [1])) for d in done),
            "seconds_mean": statistics.fmean(d["seconds"] for d in done),
        }
    return out


def run(zoo: Path, results: Path | None, only: list[str] | None, names: list[str],
        work: Path, out_path: Path, eval_examples: int) -> dict[str, Any]:
    """Scan (or read the scans of) and repair every poisoned model of ``zoo`` once per run
    in ``names``; the results so far are written to ``out_path`` after every repair."""
    truth = load_truth(zoo / MANIFEST)
    ids = [m for m, e in sorted(truth.items()) if e["poisoned"] and (only is None or m in only)]
    rows = _earlier(out_path)
    for model_id in ids:
        entry, model_dir = truth[model_id], zoo / model_id
        result = _scan(model_dir, model_id, results)
        train_file, test_file = _corpus_files(entry["corpus"], work)
        row = rows.setdefault(model_id, {
            "model_id": model_id, "corpus": entry["corpus"],
            "trigger": entry["attack"]["trigger"], "insertion": entry["attack"]["insertion"],
            "flagged": result.verdict == "trojaned",
            "inverted_trigger": result.best.trigger_text,
            "short_trigger": None if result.short_trigger is None
            else result.short_trigger.trigger_text,
            "trigger_recovered": trigger_recovered(
                entry["attack"]["trigger"], result.best.trigger_tokens,
                result.best.trigger_text)[0],
            "runs": {}})
        for name in names:
            config = _config(name, eval_examples)
            earlier = row["runs"].get(name)
            if earlier and earlier["config"] == json.loads(json.dumps(asdict(config))):
                continue
            data = train_file if RUNS[name][0] == "train" else model_dir / EXAMPLES_FILE
            out = work / "repaired" / f"{model_id}-{name}"
            base = minilm_path() if name in BASE_RUNS and entry["architecture"] == PRETRAINED \
                else None
            report = repair(model_dir, result, data, out, config, force=True, truth=entry,
                            eval_data=test_file, base_model=base)
            done = {k: report[k] for k in ("before", "after", "accuracy_drop_points",
                                           "within_margin", "stop", "kept_epoch", "seconds",
                                           "unlearned", "rounds", "end", "rescan",
                                           "config")}
            done["train"] = report["data"]["train"]
            done["history"] = [{k: h[k] for k in ("round", "epoch", "learning_rate",
                                                  "clean_accuracy", "inverted_asr", "true_asr")}
                               for h in report["history"]]
            done["neighbour_asr_after"] = [n["asr_after"] for n in report["neighbours"]]
            if report["rescan"] is not None:
                done["rescan_verdict"] = report["rescan"]["verdict"]
            row["runs"][name] = done
            before, after = report["before"], report["after"]
            print(f"{model_id} {name}: acc {before['clean_accuracy']:.3f} -> "
                  f"{after['clean_accuracy']:.3f}, true ASR {before['true_asr']:.3f} -> "
                  f"{after['true_asr']:.3f}, inverted {after['inverted_asr']}, stop "
                  f"{report['stop']} at epoch {report['kept_epoch']} of round "
                  f"{len(report['rounds'])} ({report['seconds']:.0f}s)"
                  + (f", rescan {done['rescan_verdict']}" if "rescan_verdict" in done else ""),
                  flush=True)
            atomic_write_json(out_path, _document(zoo, list(rows.values()), names))
    if not rows:
        raise SystemExit(f"no poisoned model of {zoo} passed its quality gate")
    return _document(zoo, list(rows.values()), names)


def _document(zoo: Path, rows: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    return {"zoo": str(zoo), "train_share": TRAIN_SHARE,
            "runs": {n: {"data": RUNS[n][0], "changes": RUNS[n][1]} for n in RUNS},
            "summary": _summary(rows, [n for n in RUNS if n in names or any(
                n in r["runs"] for r in rows)]),
            "per_model": rows}


def _earlier(out_path: Path) -> dict[str, dict[str, Any]]:
    """The models an earlier run wrote to ``out_path`` (rewritten after every repair, so a
    killed run resumes)."""
    try:
        earlier = json.loads(out_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {row["model_id"]: row for row in earlier.get("per_model", [])}


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run, write the results and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("zoo", type=Path, nargs="?", default=Path("runs/zoo-repair"))
    parser.add_argument("--results", type=Path, help="reuse the scans of this campaign "
                        "results directory where it has them")
    parser.add_argument("--models", help="comma-separated model ids (default: every "
                        "poisoned model)")
    parser.add_argument("--runs", default="paper,default", help="comma-separated runs, of "
                        + ", ".join(RUNS))
    parser.add_argument("--eval-examples", type=int, default=RepairConfig.max_eval_examples,
                        help="test-split examples measured on (a seeded sample; default "
                        "%(default)s)")
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/repair-settings.json"))
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown run {unknown[0]!r}; expected some of {', '.join(RUNS)}")
    only = args.models.split(",") if args.models else None
    with tempfile.TemporaryDirectory(prefix="repair-bench-") as work:
        out = run(args.zoo, args.results, only, names, Path(work), args.out,
                  args.eval_examples)
    print("\n| run | models | train examples | clean acc before -> after | "
          "true-trigger ASR before -> after | within guard | ASR <= 0.05 | re-scan clean | "
          "rounds | s |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, s in out["summary"].items():
        print(f"| {name} | {s['models']} | {s['train_examples_mean']:.0f} | "
              f"{s['before']['clean_accuracy']:.3f} -> {s['after']['clean_accuracy']:.3f} | "
              f"{s['before']['true_asr']:.3f} -> {s['after']['true_asr']:.3f} | "
              f"{s['within_margin']} | {s['true_asr_at_most_0.05']} | "
              f"{s.get('rescan_clean', 0)} | {s.get('rounds_mean', 1):.1f} | "
              f"{s['seconds_mean']:.0f} |")
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
