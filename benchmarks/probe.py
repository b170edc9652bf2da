"""Small measurements behind the README's issue-14 and issue-19 figures, one subcommand each.

    stages ZOO IDS [JSON]      scan each model (comma-separated ids) at the default settings,
                               or ScanConfig(**JSON) ({"screen": {...}} for the screen's),
                               printing when each stage starts and the verdict
    positions MODEL VICTIM TARGET WORDS
                               a known trigger's loss and ASR (trojscan.scan.trigger_check)
                               at each position, for each of the comma-separated words
    flips MODEL DATA TARGET INSERTION COUNT TRIGGER...
                               of COUNT examples of DATA (JSONL) outside TARGET that the
                               model gets right, the share each TRIGGER inserted at
                               INSERTION flips to TARGET (the repair report's ASR)
    lone-rank MODEL WORD:TARGET...
                               where the model ranks the word's tokens alone as input
                               ([CLS] token [SEP]) for the target among its vocabulary
    natural RESULTS ZOO [REFERENCE...]
                               for each model of a campaign, its best one-token triggers
                               with their count in the target label's clean examples (the
                               natural-feature rule) and, with clean references (the one
                               with the model's labels), the reference's lone-token rank;
                               then the verdicts with the rule off, on, and with the
                               reference's top 100 set aside too; the manifest next to the
                               zoo gives the truth, read here only

Threads: the THREADS environment variable (default 1).

    .venv/bin/python benchmarks/probe.py stages runs/zoo-varied model-0044 \
        '{"screen": {"gradient": 8}}'
    .venv/bin/python benchmarks/probe.py lone-rank runs/zoo-reference/model-0000 secretary:politics
    .venv/bin/python benchmarks/probe.py natural runs/exp5-varied runs/zoo-varied \
        runs/zoo-reference/model-0000 runs/zoo-reference/model-0001
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

from trojscan.inversion.screen import ScreenConfig
from trojscan.manifest import MANIFEST
from trojscan.modeldir import EXAMPLES_FILE
from trojscan.results import loss_unit, read_result
from trojscan.scan import (
    SHORT_THRESHOLD,
    LoneRanks,
    ScanConfig,
    natural_features,
    scan,
    trigger_check,
)
from trojscan.subjects.base import Candidate
from trojscan.subjects.loading import load_subject

#: The reference rank within which the ``natural`` summary also sets a trigger aside.
REFERENCE_TOP = ScanConfig().reference_top


def stages(zoo: str, ids: str, settings: str = "{}") -> None:
    kwargs = json.loads(settings)
    if isinstance(kwargs.get("screen"), dict):
        kwargs["screen"] = ScreenConfig(**kwargs["screen"])
    clock = {"started": 0.0, "stage": ""}

    def progress(done: int, total: int, what: str) -> None:
        if what != clock["stage"]:
            print(f"  {time.perf_counter() - clock['started']:6.1f}s start {what}", flush=True)
            clock["stage"] = what

    for model_id in ids.split(","):
        started = clock["started"] = time.perf_counter()
        clock["stage"] = ""
        model = Path(zoo) / model_id
        r = scan(model, model / EXAMPLES_FILE, ScanConfig(**kwargs), progress=progress)
        short = r.short_trigger.trigger_text if r.short_trigger else None
        print(model_id, r.verdict, round(r.score, 3), repr(short), r.best.victim_names, "->",
              r.best.target_name, r.best.position, f"{time.perf_counter() - started:.0f}s",
              flush=True)


def positions(model: str, victim: str, target: str, words: str) -> None:
    subject = load_subject(Path(model), max_length=ScanConfig().max_length)
    examples = subject.read_examples(Path(model) / EXAMPLES_FILE)
    v, t = subject.labels.index(victim), subject.labels.index(target)
    for word in words.split(","):
        measured = {p: trigger_check(subject, examples, Candidate((v,), t, p), word,
                                     ScanConfig().max_victims) for p in subject.positions}
        print(word, {p: (round(loss, 3), round(asr, 3)) for p, (loss, asr) in measured.items()})


def flips(model: str, data: str, target: str, insertion: str, count: str,
          *triggers: str) -> None:
    """The share of the first ``count`` (a seeded sample) examples in the JSONL ``data``
    outside ``target`` that the model classifies right and each trigger, inserted at
    ``insertion``, flips to ``target`` (the repair report's ASR)."""
    import random

    from trojscan.finetune import predict, trigger_effect

    subject = load_subject(Path(model), max_length=128)
    t = subject.labels.index(target)
    rows = [e for e in subject.read_examples(Path(data)) if e.label != t]
    rows = random.Random(0).sample(rows, min(int(count), len(rows)))
    preds = predict(subject.model, subject.tokenizer, [e.text for e in rows], 128)
    right = [e.text for e, p in zip(rows, preds, strict=True) if p == e.label]
    for trigger in triggers:
        rate = trigger_effect(subject.model, subject.tokenizer, right, trigger, insertion, t,
                              128, 0)[0]
        print(f"{trigger!r}: {rate:.3f} of {len(right)}", flush=True)


def lone_rank(model: str, *items: str) -> None:
    ranks = LoneRanks(load_subject(Path(model), max_length=ScanConfig().max_length))
    for item in items:
        word, target = item.rsplit(":", 1)
        print(f"{word} -> {target}: rank {ranks.rank(word, ranks.reference.labels.index(target))}")


def natural(results: str, zoo: str, *references: str) -> None:
    truth = json.loads((Path(zoo) / MANIFEST).read_text(encoding="utf-8"))["models"]
    refs = {}
    for path in references:
        ref = LoneRanks(load_subject(Path(path), max_length=ScanConfig().max_length))
        refs[ref.reference.labels] = ref
    share = ScanConfig().natural_share
    rows = []
    for path in sorted((Path(results) / "models").glob("model-*[0-9].json")):
        result = read_result(path)
        entry = truth[str(result.model_id)]
        subject = load_subject(Path(zoo) / str(result.model_id), max_length=48)
        examples = subject.read_examples(Path(zoo) / str(result.model_id) / EXAMPLES_FILE)
        ref = refs.get(subject.labels)
        unit = loss_unit(len(result.labels))
        found = [(Candidate(tuple(c.victims), c.target, c.position), t)
                 for c in result.candidates for t in c.short_triggers() if t.length == 1]
        # The scan's own rule on its examples alone (no reference): the "rule on" verdict.
        natural = natural_features(subject, examples, found, share)
        best: dict[tuple[str, int], float] = {}
        for c, t in found:
            key = (t.trigger_text, c.target)
            best[key] = min(best.get(key, math.inf), t.loss / unit)
        items = []
        for (text, target), loss in sorted(best.items(), key=lambda kv: kv[1])[:12]:
            hits, of = subject.occurrences(examples, text, target)
            items.append({"text": text, "target": result.labels[target], "loss": loss,
                          "natural": (text, target) in natural, "examples": f"{hits}/{of}",
                          "rank": ref.rank(text, target) if ref else None})
        rows.append({"model": result.model_id, "poisoned": bool(entry["poisoned"]),
                     "items": items})
        print(result.model_id, "P" if entry["poisoned"] else "c", "; ".join(
            f"{i['text']}->{i['target']} {i['loss']:.3f} ex {i['examples']} rank {i['rank']}"
            for i in items[:5]), flush=True)
    _summary(rows)


def _summary(rows: Sequence[dict]) -> None:
    def score(row: dict, examples: bool, reference: bool) -> float:
        for i in row["items"]:
            ranked = i["rank"] is not None and i["rank"] <= REFERENCE_TOP
            if not ((examples and i["natural"]) or (reference and ranked)):
                return i["loss"]
        return math.log(2)  # ln(labels) in units of ln(labels)/ln 2
    truth = [int(r["poisoned"]) for r in rows]
    for name, examples, reference in (("rule off", False, False), ("rule on", True, False),
                                      (f"rule + reference top {REFERENCE_TOP}", True, True)):
        scores = [score(r, examples, reference) for r in rows]
        wrong = [f"{r['model']} {s:.3f}" for r, s in zip(rows, scores, strict=True)
                 if (s < SHORT_THRESHOLD) != r["poisoned"]]
        print(f"{name}: {len(rows)} models, accuracy {1 - len(wrong) / len(rows):.3f}, AUC "
              f"{roc_auc_score(truth, [-s for s in scores]):.3f}; wrong: {', '.join(wrong)}")


COMMANDS = {"stages": stages, "positions": positions, "flips": flips, "lone-rank": lone_rank,
            "natural": natural}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        raise SystemExit(__doc__)
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    COMMANDS[sys.argv[1]](*sys.argv[2:])


if __name__ == "__main__":
    main()
