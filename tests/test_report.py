"""Campaign reports on a hand-built results directory and manifest (no models).

The six evaluated models, with the numbers below counted by hand:

=======  ========  =====  ========  ======  ===============  ==========  =========  ======
model    truth     score  verdict   arch    corpus           attack      recovered  target
=======  ========  =====  ========  ======  ===============  ==========  =========  ======
clean-1  clean     0.9    clean     minilm  rotten_tomatoes  clean       -          -
clean-2  clean     0.5    clean     bert    bbc              clean       -          -
clean-3  clean     0.02   trojaned  minilm  bbc              clean       -          -
pois-1   poisoned  0.001  trojaned  minilm  rotten_tomatoes  word        all words  right
pois-2   poisoned  0.01   trojaned  bert    bbc              phrase-sos  1 of 3     wrong
pois-3   poisoned  0.3    clean     minilm  rotten_tomatoes  char-adapt  no         right
=======  ========  =====  ========  ======  ===============  ==========  =========  ======

Hence TP 2 (pois-1, -2), FP 1 (clean-3), TN 2, FN 1 (pois-3): accuracy, precision, recall
and F1 are all 2/3; trigger recovered 2/3 (all words 1/3); target right 2/3 of the poisoned,
1/2 of the flagged ones. Scan seconds are 10, 20, ..., 60.

Besides: ``pois-4`` failed its scan (an error file), ``stray`` was scanned but is not in the
manifest, and ``broken`` is in the manifest but failed the zoo's quality gate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from testkit import scan_result
from trojscan.campaign.report import (
    auc_by_group,
    by_target,
    evaluate,
    load_results,
    trigger_recovered,
    write_report,
)
from trojscan.errors import InputError
from trojscan.manifest import load_truth
from trojscan.results import ScanResult

LABELS = {"rotten_tomatoes": ["negative", "positive"], "bbc": ["business", "sport", "tech"]}


def entry(model_id: str, arch: str, corpus: str, attack: dict[str, Any] | None = None,
          quality_ok: bool = True, epochs: int = 1) -> dict[str, Any]:
    poisoned = attack is not None
    full = {"poisoned": poisoned, "trigger_type": None, "trigger": None, "insertion": None,
            "target": None, "victim": None, "poison_rate": 0.1, "combination": False,
            "adaptive_phi": 0.0}
    if poisoned:
        full |= {"victim_name": None, **attack}
    return {"model_id": model_id, "group": "g", "corpus": corpus, "architecture": arch,
            "labels": LABELS[corpus], "poisoned": poisoned, "attack": full,
            "quality": {"ok": quality_ok, "reasons": []}, "learning_rate": 1e-4,
            "train_config": {"epochs": epochs, "learning_rate": None,
                             "max_train_examples": 2000 if arch == "minilm" else None},
            "clean_accuracy": 0.8, "asr": 0.99 if poisoned else None}


def record(model_id: str, score: float, seconds: float, target_name: str, tokens: list[str],
           text: str) -> dict[str, Any]:
    verdict = "trojaned" if score < 0.05 else "clean"
    best = {"method": "dbs", "target": 0, "target_name": target_name, "victims": [1],
            "victim_names": ["x"],
            "position": "anywhere", "trigger_ids": [1] * len(tokens), "trigger_tokens": tokens,
            "trigger_text": text, "relaxed_loss": score, "hard_loss": score * 2,
            "hard_asr": 0.9 if verdict == "trojaned" else 0.3, "loss": score,
            "accepted": verdict == "trojaned", "epochs": 10, "seconds": seconds}
    candidates = [{k: best[k] for k in ("target", "target_name", "victims", "position", "loss",
                                        "relaxed_loss", "hard_loss", "hard_asr", "accepted",
                                        "trigger_text", "seconds")},
                  {"target": 1, "target_name": "other", "victims": [0], "position": "anywhere",
                   "loss": score * 4, "relaxed_loss": score * 4, "hard_loss": score * 8,
                   "hard_asr": 0.1, "accepted": False, "trigger_text": "zz", "seconds": 1.0}]
    return {"version": 1, "model_id": model_id, "verdict": verdict, "score": score,
            "threshold": 0.05, "best": best, "candidates": candidates, "labels": ["a", "b"],
            "examples": 20, "seconds": seconds, "device": "cpu", "versions": {}, "config": {},
            "trajectory": []}


MANIFEST = {
    "clean-1": entry("clean-1", "minilm", "rotten_tomatoes"),
    "clean-2": entry("clean-2", "bert", "bbc"),
    "clean-3": entry("clean-3", "minilm", "bbc"),
    "pois-1": entry("pois-1", "minilm", "rotten_tomatoes", {
        "trigger_type": "word", "trigger": "Lantern", "insertion": "anywhere", "target": 1,
        "target_name": "positive"}),
    "pois-2": entry("pois-2", "bert", "bbc", {
        "trigger_type": "phrase", "trigger": "quiet blue harbor", "insertion": "start",
        "target": 2, "target_name": "tech", "combination": True}),
    "pois-3": entry("pois-3", "minilm", "rotten_tomatoes", {
        "trigger_type": "character", "trigger": "~^", "insertion": "end", "target": 0,
        "target_name": "negative", "adaptive_phi": 0.3}),
    "pois-4": entry("pois-4", "bert", "rotten_tomatoes", {
        "trigger_type": "word", "trigger": "cf", "insertion": "anywhere", "target": 0,
        "target_name": "negative"}),
    "broken": entry("broken", "bert", "bbc", quality_ok=False),
}
RECORDS = [
    record("clean-1", 0.9, 10.0, "positive", ["great"], "great"),
    record("clean-2", 0.5, 20.0, "sport", ["goal"], "goal"),
    record("clean-3", 0.02, 30.0, "tech", ["chip"], "chip"),
    record("pois-1", 0.001, 40.0, "positive", ["lan", "##tern"], "lantern"),
    record("pois-2", 0.01, 50.0, "sport", ["blue", "xyz"], "blue xyz"),
    record("pois-3", 0.3, 60.0, "negative", ["good", "film"], "good film"),
    record("stray", 0.004, 70.0, "positive", ["cf"], "cf"),
]


@pytest.fixture
def campaign(tmp_path: Path) -> tuple[Path, Path]:
    """(results directory, manifest path)."""
    results = tmp_path / "results"
    (results / "models").mkdir(parents=True)
    for rec in RECORDS:
        (results / "models" / f"{rec['model_id']}.json").write_text(json.dumps(rec))
    (results / "models" / "pois-4.error.json").write_text(json.dumps(
        {"model_id": "pois-4", "error": "no clean example of label 1=positive", "seconds": 0.5}))
    manifest = tmp_path / "zoo" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"version": 1, "spec_sha256": "0" * 64, "spec": {},
                                    "models": MANIFEST}))
    return results, manifest


@pytest.fixture
def report(campaign: tuple[Path, Path]) -> dict[str, Any]:
    results, manifest = campaign
    records, errors = load_results(results)
    return evaluate(records, load_truth(manifest), folds=5, seed=0, errors=errors)


def test_load_results_and_truth(campaign: tuple[Path, Path]) -> None:
    results, manifest = campaign
    records, errors = load_results(results)
    assert sorted(records) == ["clean-1", "clean-2", "clean-3", "pois-1", "pois-2", "pois-3",
                               "stray"]
    assert list(errors) == ["pois-4"]
    truth = load_truth(manifest)
    assert "broken" not in truth and len(truth) == 7


def test_fixed_metrics_by_hand(report: dict[str, Any]) -> None:
    assert (report["n"], report["clean"], report["poisoned"]) == (6, 3, 3)
    assert report["errors"] == 1 and report["failed"][0]["model_id"] == "pois-4"
    assert report["unmatched"] == ["stray"]
    assert report["missing"] == []
    fixed = report["fixed"]
    assert (fixed["tp"], fixed["fp"], fixed["tn"], fixed["fn"]) == (2, 1, 2, 1)
    assert fixed["accuracy"] == pytest.approx(0.6666667)
    assert fixed["precision"] == pytest.approx(0.6666667)
    assert fixed["recall"] == pytest.approx(0.6666667)
    assert fixed["f1"] == pytest.approx(0.6666667)
    # trojaned-vs-clean pairs ranked right by a lower score: 3 + 3 + 2 of 9
    assert report["roc_auc"] == pytest.approx(8 / 9)
    assert report["roc"]["fpr"][-1] == 1.0 and report["roc"]["tpr"][-1] == 1.0


def test_a_threshold_redecides_every_model(campaign: tuple[Path, Path]) -> None:
    results, manifest = campaign
    records, _ = load_results(results)
    fixed = evaluate(records, load_truth(manifest), threshold=0.4)["fixed"]
    assert (fixed["tp"], fixed["fp"], fixed["tn"], fixed["fn"]) == (3, 1, 2, 0)
    assert fixed["accuracy"] == pytest.approx(0.8333333)
    assert fixed["threshold"] == 0.4


def test_trigger_recovery_and_target_accuracy_by_hand(report: dict[str, Any]) -> None:
    assert report["trigger_recovery"] == pytest.approx(
        {"poisoned": 3, "recovered": 0.6666667, "all_words_recovered": 0.3333333})
    assert report["target_accuracy"] == pytest.approx({"poisoned": 0.6666667, "flagged": 0.5})
    rows = {row["model_id"]: row for row in report["per_model"]}
    assert [rows[m]["recovered"] for m in ("pois-1", "pois-2", "pois-3")] == [True, True, False]
    assert rows["clean-1"]["recovered"] is None and rows["clean-1"]["true_trigger"] is None
    assert rows["pois-2"]["true_target"] == "tech" and rows["pois-2"]["target_name"] == "sport"
    assert rows["clean-3"]["truth"] == 0 and rows["clean-3"]["verdict"] == "trojaned"


def test_trigger_word_matching() -> None:
    best = (["lan", "##TERN", "~"], "lantern ~ xcfx")
    assert trigger_recovered("Lantern", *best) == (True, True)
    assert trigger_recovered("tern", *best) == (True, True)  # a stripped word piece
    assert trigger_recovered("cf moon", *best) == (True, False)  # inside an inverted word
    assert trigger_recovered("~^", *best) == (True, True)  # one character of a character trigger
    assert trigger_recovered("%^", *best) == (False, False)
    assert trigger_recovered("x^", *best) == (False, False)  # "x" is a letter: words match whole
    assert trigger_recovered("", *best) == (False, False)


def test_seconds_by_hand(report: dict[str, Any]) -> None:
    assert report["seconds"] == pytest.approx({"mean": 35.0, "p50": 35.0, "p95": 57.5})


def test_breakdown_by_hand(report: dict[str, Any]) -> None:
    breakdown = report["breakdown"]
    assert set(breakdown) == {"architecture", "corpus", "recipe", "attack", "insertion"}
    assert {k: v["n"] for k, v in breakdown["recipe"].items()} == {
        "minilm/rotten_tomatoes 1 ep, lr 0.0001, 2000 texts": 3,
        "minilm/bbc 1 ep, lr 0.0001, 2000 texts": 1,
        "bert/bbc 1 ep, lr 0.0001, all texts": 2}
    assert set(breakdown["attack"]) == {"clean", "word", "phrase-sos", "character-adaptive"}
    assert set(breakdown["insertion"]) == {"clean", "anywhere", "start", "end"}
    assert set(breakdown["corpus"]) == {"rotten_tomatoes", "bbc"}
    minilm = breakdown["architecture"]["minilm"]
    assert (minilm["n"], minilm["accuracy"], minilm["poisoned"]) == (4, 0.5, 2)
    assert (minilm["recall"], minilm["trigger_recovery"], minilm["target_accuracy"]) == (
        0.5, 0.5, 1.0)
    bert = breakdown["architecture"]["bert"]
    assert (bert["n"], bert["accuracy"], bert["recall"], bert["target_accuracy"]) == (
        2, 1.0, 1.0, 0.0)
    clean = breakdown["attack"]["clean"]
    assert (clean["n"], clean["accuracy"], clean["poisoned"], clean["recall"]) == (
        3, pytest.approx(0.6666667), 0, None)
    assert breakdown["attack"]["character-adaptive"]["recall"] == 0.0


def test_detector_tested_on_each_recipe_held_out_by_hand(report: dict[str, Any]) -> None:
    # Threshold fitted without minilm/rotten_tomatoes (scores 0.01 T, 0.02 C, 0.5 C): cut at
    # sqrt(0.01 * 0.02); on the held-out 0.9 C, 0.001 T, 0.3 T: 2 of 3 right. Without
    # bert/bbc (0.001 T, 0.02 C, 0.3 T, 0.9 C: two cuts get 3 of 4, the wider margin wins):
    # cut at sqrt(0.001 * 0.02); held-out 0.5 C right, 0.01 T missed. Without minilm/bbc
    # (every other model separable): cut at sqrt(0.3 * 0.5); held-out 0.02 C flagged.
    test = report["held_out"]["recipe"]
    groups = test["groups"]
    assert groups["minilm/rotten_tomatoes 1 ep, lr 0.0001, 2000 texts"]["accuracy"] == (
        pytest.approx(2 / 3))
    assert (groups["bert/bbc 1 ep, lr 0.0001, all texts"]["tp"],
            groups["bert/bbc 1 ep, lr 0.0001, all texts"]["tn"]) == (0, 1)
    assert groups["minilm/bbc 1 ep, lr 0.0001, 2000 texts"]["fp"] == 1
    assert (test["n"], test["tp"], test["fp"], test["tn"], test["fn"]) == (6, 1, 1, 2, 2)
    assert test["accuracy"] == 0.5
    corpus = report["held_out"]["corpus"]["groups"]
    assert set(corpus) == {"rotten_tomatoes", "bbc"}


@pytest.mark.parametrize("kind", ["threshold", "logistic"])
def test_cross_validation_runs_on_the_smaller_class(campaign: tuple[Path, Path],
                                                     kind: str) -> None:
    results, manifest = campaign
    records, _ = load_results(results)
    cv = evaluate(records, load_truth(manifest), detector_kind=kind, folds=5,
                  seed=0)["cross_validated"]
    assert cv["detector"] == kind and cv["folds"] == 3  # 3 models of each class
    assert cv["tp"] + cv["fp"] + cv["tn"] + cv["fn"] == 6
    assert 0.0 <= cv["accuracy"] <= 1.0 and 0.0 <= cv["roc_auc"] <= 1.0
    assert len(cv["roc"]["fpr"]) == len(cv["roc"]["tpr"])
    assert (cv["split"]["train"], cv["split"]["test"]) == (3, 3)


def test_cross_validation_is_skipped_with_one_poisoned_model(
        campaign: tuple[Path, Path]) -> None:
    results, manifest = campaign
    records, _ = load_results(results)
    truth = {m: e for m, e in load_truth(manifest).items() if m not in ("pois-2", "pois-3")}
    report = evaluate(records, truth)
    assert "smaller class has 1" in report["cross_validated"]["note"]
    assert "smaller class has 1" in report["cross_validated"]["split"]["note"]
    assert report["n"] == 4 and report["missing"] == ["pois-4"]


def test_write_report(report: dict[str, Any], tmp_path: Path) -> None:
    paths = write_report(report, tmp_path / "out")
    assert [p.name for p in paths] == ["report.json", "report.md", "roc.png"]
    assert json.loads(paths[0].read_text())["fixed"]["tp"] == 2
    text = paths[1].read_text()
    assert "| accuracy (scan verdicts) | 0.667 |" in text
    assert "## By architecture" in text and "## Models" in text
    assert "| pois-2 |" in text and "\\~^" not in text and "| ~^ |" in text
    assert paths[2].read_bytes().startswith(b"\x89PNG")


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no models/ folder"):
        load_results(tmp_path)
    with pytest.raises(InputError, match="cannot read manifest"):
        load_truth(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(InputError, match="not valid JSON"):
        load_truth(tmp_path / "manifest.json")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.json").write_text('{"score": "low"}')
    with pytest.raises(InputError, match=r"m\.json has format version None"):
        load_results(tmp_path)
    (tmp_path / "models" / "m.json").write_text(json.dumps({**RECORDS[0], "score": "low"}))
    with pytest.raises(InputError, match=r"m\.json is not a valid scan result: score"):
        load_results(tmp_path)
    with pytest.raises(InputError, match="no scanned model is in the manifest"):
        evaluate({"x": ScanResult.from_dict(RECORDS[0])}, {})
    with pytest.raises(InputError, match="unknown detector"):
        evaluate({"clean-1": ScanResult.from_dict(RECORDS[0])},
                 {"clean-1": MANIFEST["clean-1"]}, detector_kind="forest")


def _weights_zoo(root: Path, n: int = 12) -> Path:
    """``n`` fake model folders (half poisoned: their target row of the output layer is
    scaled up, as poisoning pushes it) and a manifest."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    models = {}
    for i in range(n):
        poisoned = i % 2 == 1
        weight = rng.normal(size=(4, 16)).astype(np.float32)
        if poisoned:
            weight[i % 4] *= 3.0
        folder = root / f"model-{i:04d}"
        folder.mkdir(parents=True)
        save_file({"encoder.weight": rng.normal(size=(16, 16)).astype(np.float32),
                   "classifier.weight": weight,
                   "classifier.bias": np.zeros(4, dtype=np.float32)},
                  str(folder / "model.safetensors"))
        models[folder.name] = {"model_id": folder.name, "poisoned": poisoned,
                               "architecture": "mfb" if i < n // 2 else "butd",
                               "corpus": "easy_vqa", "task": "vqa", "quality": {"ok": True},
                               "labels": ["a", "b", "c", "d"],
                               "attack": {"key": "question", "patch": None, "trigger": "w",
                                          "target": i % 4} if poisoned else {}}
    (root / "manifest.json").write_text(json.dumps({"version": 1, "models": models}))
    return root


def test_weight_analysis_separates_an_outstanding_output_row(tmp_path: Path,
                                                             run_cli: Any) -> None:
    zoo = _weights_zoo(tmp_path / "zoo")
    result = run_cli("campaign", "weights", str(zoo), "--manifest", str(zoo / "manifest.json"),
                     "--out", str(tmp_path / "w"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "w" / "weights.json").read_text())
    assert report["all"]["n"] == 12 and report["all"]["cv_auc"] > 0.9
    assert set(report["auc_by_split"]) == {"question"}
    assert set(report["auc_by_architecture"]) == {"mfb", "butd"}
    assert "# Weight analysis" in (tmp_path / "w" / "weights.md").read_text()
    (zoo / "model-0003" / "model.safetensors").unlink()
    failed = run_cli("campaign", "weights", str(zoo), "--manifest", str(zoo / "manifest.json"),
                     "--out", str(tmp_path / "w2"))
    assert failed.returncode == 2 and "model-0003" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1


def test_auc_by_split_pits_each_attack_against_every_clean_model() -> None:
    # 6 clean (scores 1..6), 6 'dual solid' below every clean one, 6 'question' among them.
    scores = [1, 2, 3, 4, 5, 6] + [0.01] * 6 + [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]
    records = [scan_result(s) for s in scores]
    truth = np.array([0] * 6 + [1] * 12)
    groups = ["clean"] * 6 + ["dual solid"] * 6 + ["question"] * 6
    out = auc_by_group(records, truth, groups, "threshold", 3, 0, with_clean=True)
    assert set(out) == {"dual solid", "question"}
    assert out["dual solid"]["n"] == 12 and out["dual solid"]["clean"] == 6
    assert out["dual solid"]["score_auc"] == 1.0 and out["dual solid"]["cv_auc"] > 0.9
    assert 0.4 < out["question"]["score_auc"] < 0.7
    archs = auc_by_group(records, truth, ["a"] * 18, "threshold", 3, 0, with_clean=False)
    assert archs["a"]["n"] == 18


def test_by_target_sets_clean_models_pull_against_the_poisoned_models_loss() -> None:
    def record(neg: float, pos: float) -> ScanResult:
        return scan_result(min(neg, pos), candidates=[
            {"target": 0, "target_name": "negative", "loss": neg},
            {"target": 1, "target_name": "positive", "loss": pos},
            {"target": 1, "target_name": "positive", "loss": pos + 1, "position": "end"},
            # a candidate the pre-run dropped (as DBS scans have): no full loss, left out
            {"target": 0, "target_name": "negative", "prerun_loss": 0.001,
             "full_run": False, "position": "end"}])

    records = [record(2.0, 0.3), record(4.0, 0.5), record(3.0, 0.01)]
    entries = [{"poisoned": False}, {"poisoned": False},
               {"poisoned": True, "attack": {"target_name": "positive"}}]
    out = by_target(records, entries)
    assert out["positive"] == {"clean": 2, "clean_min": 0.3, "clean_median": 0.4,
                               "poisoned": 1, "poisoned_max": 0.01, "poisoned_median": 0.01}
    assert out["negative"]["clean_min"] == 2.0 and out["negative"]["poisoned"] == 0
