"""The method comparison table on hand-built results directories and a manifest (no models).

Ground truth: clean ``c1``, ``c2``; poisoned ``p1`` (trigger "lantern" -> positive) and ``p2``
(trigger "blue moon" -> negative); ``gate`` is poisoned but failed the zoo's quality gate, so
it is not ground truth. Two runs, counted by hand:

=====  ==========================  ==========================
model  dbs: score, verdict, secs   uat: score, verdict, secs
=====  ==========================  ==========================
c1     0.5    clean     10         0.9    clean     1
c2     0.01   trojaned  20         0.8    clean     2
p1     0.001  trojaned  30         0.03   trojaned  3
p2     0.02   trojaned  40         (scan failed: error file)
stray  -                           0.1    clean     1   (not in the manifest)
=====  ==========================  ==========================

dbs inverts "lantern x" -> positive on p1 (recovered, target right) and "blue" -> positive on
p2 (recovered, one word of two; target wrong); uat inverts "foo" -> positive on p1 (not
recovered, target right).

On the common models (c1, c2, p1): dbs TP 1, FP 1, TN 1 -> accuracy 2/3, precision 1/2,
recall 1, AUC 1 (p1's score is the lowest), recovery 1, target 1, 20 s; uat TP 1, TN 2 ->
accuracy, precision, recall, AUC 1, recovery 0, target 1, 2 s, 1 scan error.

On all models: dbs adds p2 (TP): accuracy 3/4, precision 2/3, recall 1; AUC 3/4 (of the four
poisoned-clean pairs only p2 (0.02) vs c2 (0.01) is misordered); recovery 1, target 1/2,
25 s. uat is unchanged (its p2 failed, stray is not in the manifest).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from testkit import scan_result
from trojscan.campaign.compare import compare, markdown, write_comparison
from trojscan.errors import InputError
from trojscan.manifest import load_truth


def _entry(model_id: str, attack: dict[str, Any] | None = None, ok: bool = True) -> dict[str, Any]:
    full = {"poisoned": attack is not None, "trigger_type": "word", "insertion": "anywhere",
            "combination": False, "adaptive_phi": 0.0, **(attack or {})}
    return {"model_id": model_id, "corpus": "rotten_tomatoes", "architecture": "bert",
            "labels": ["negative", "positive"], "poisoned": attack is not None,
            "attack": full, "quality": {"ok": ok, "reasons": []}}


MANIFEST = {"version": 1, "models": {
    "c1": _entry("c1"),
    "c2": _entry("c2"),
    "p1": _entry("p1", {"trigger": "lantern", "target_name": "positive"}),
    "p2": _entry("p2", {"trigger": "blue moon", "target_name": "negative"}),
    "gate": _entry("gate", {"trigger": "zz", "target_name": "positive"}, ok=False),
}}


def _record(score: float, seconds: float, tokens: list[str] | None = None,
            target_name: str = "positive") -> dict[str, Any]:
    tokens = tokens or ["the"]
    best = {"target_name": target_name, "trigger_tokens": tokens,
            "trigger_text": " ".join(tokens)}
    return scan_result(score, best=best, seconds=seconds).to_dict()


RUNS: dict[str, dict[str, dict[str, Any]]] = {
    "dbs": {"c1": _record(0.5, 10), "c2": _record(0.01, 20),
            "p1": _record(0.001, 30, ["lantern", "x"]), "p2": _record(0.02, 40, ["blue"])},
    "uat": {"c1": _record(0.9, 1), "c2": _record(0.8, 2), "p1": _record(0.03, 3, ["foo"]),
            "stray": _record(0.1, 1)},
}


@pytest.fixture
def runs(tmp_path: Path) -> tuple[list[tuple[str, Path]], dict[str, dict[str, Any]]]:
    named = []
    for name, records in RUNS.items():
        folder = tmp_path / name / "models"
        folder.mkdir(parents=True)
        for model_id, record in records.items():
            (folder / f"{model_id}.json").write_text(json.dumps(record), encoding="utf-8")
        named.append((name, tmp_path / name))
    (tmp_path / "uat" / "models" / "p2.error.json").write_text(
        json.dumps({"error": "out of memory"}), encoding="utf-8")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(MANIFEST), encoding="utf-8")
    return named, load_truth(manifest)


def _values(comparison: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["key"]: row["values"] for row in comparison["rows"]}


def test_common_models_counted_by_hand(runs: Any) -> None:
    named, truth = runs
    comparison = compare(named, truth)
    assert comparison["methods"] == ["dbs", "uat"]
    assert comparison["models"] == ["c1", "c2", "p1"]
    assert [row["key"] for row in comparison["rows"]] == [
        "models", "errors", "accuracy", "precision", "recall", "roc_auc", "cv_accuracy",
        "trigger_recovery",
        "target_accuracy", "seconds"]
    values = _values(comparison)
    assert {k: v["dbs"] for k, v in values.items()} == pytest.approx({
        "models": 3, "errors": 0, "accuracy": 2 / 3, "precision": 1 / 2, "recall": 1.0,
        "roc_auc": 1.0, "cv_accuracy": None, "trigger_recovery": 1.0, "target_accuracy": 1.0,
        "seconds": 20.0})
    assert {k: v["uat"] for k, v in values.items()} == pytest.approx({
        "models": 3, "errors": 1, "accuracy": 1.0, "precision": 1.0, "recall": 1.0,
        "roc_auc": 1.0, "cv_accuracy": None, "trigger_recovery": 0.0, "target_accuracy": 1.0,
        "seconds": 2.0})
    assert comparison["reports"]["uat"]["unmatched"] == []  # stray is outside the common set


def test_all_models_counted_by_hand(runs: Any) -> None:
    named, truth = runs
    comparison = compare(named, truth, common_only=False)
    assert comparison["models"] is None
    values = _values(comparison)
    assert {k: v["dbs"] for k, v in values.items()} == pytest.approx({
        "models": 4, "errors": 0, "accuracy": 3 / 4, "precision": 2 / 3, "recall": 1.0,
        "roc_auc": 3 / 4, "cv_accuracy": 0.5, "trigger_recovery": 1.0, "target_accuracy": 1 / 2,
        "seconds": 25.0})
    # 2 clean + 2 poisoned: 2-fold CV of the threshold detector (test_report checks its folds)
    assert values["cv_accuracy"]["dbs"] == (
        comparison["reports"]["dbs"]["cross_validated"]["accuracy"])
    assert values["models"]["uat"] == 3 and values["accuracy"]["uat"] == 1.0
    assert comparison["reports"]["uat"]["unmatched"] == ["stray"]


def test_threshold_redecides_and_a_ratio_without_denominator_is_a_dash(runs: Any) -> None:
    named, truth = runs
    comparison = compare(named, truth, threshold=0.005)
    values = _values(comparison)
    # dbs: only p1 (0.001) is under 0.005 -> all three right; uat: nothing flagged -> p1 missed.
    assert values["accuracy"] == pytest.approx({"dbs": 1.0, "uat": 2 / 3})
    assert values["recall"] == pytest.approx({"dbs": 1.0, "uat": 0.0})
    assert values["precision"]["uat"] is None
    lines = markdown(comparison).splitlines()
    assert "score under 0.005" in lines[2]
    assert "| precision | 1.000 | - |" in lines


def test_markdown_layout_and_files(runs: Any, tmp_path: Path) -> None:
    named, truth = runs
    comparison = compare(named, truth)
    text = markdown(comparison)
    lines = text.splitlines()
    assert lines[0] == "# Method comparison"
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| metric | dbs | uat |"
    assert table[1] == "|---|---|---|"
    assert table[2:] == [
        "| models compared | 3 | 3 |",
        "| scan errors | 0 | 1 |",
        "| accuracy | 0.667 | 1.000 |",
        "| precision | 0.500 | 1.000 |",
        "| recall | 1.000 | 1.000 |",
        "| ROC AUC (score / ln labels) | 1.000 | 1.000 |",
        "| accuracy, threshold fitted (k-fold CV) | - | - |",  # 1 poisoned model: no CV
        "| trigger recovered (any word) | 1.000 | 0.000 |",
        "| target correct (poisoned) | 1.000 | 1.000 |",
        "| seconds per model (mean) | 20.000 | 2.000 |",
    ]
    json_path, md_path = write_comparison(comparison, tmp_path / "out")
    assert md_path.read_text(encoding="utf-8") == text
    assert json.loads(json_path.read_text(encoding="utf-8"))["rows"] == comparison["rows"]


def test_rows_per_architecture_when_the_zoo_has_several(runs: Any) -> None:
    named, truth = runs
    # bert: c1, p1; gpt2: c2, p2 (dbs scores p2 0.02 above c2 0.01; uat's p2 failed)
    truth = {m: {**e, "architecture": "gpt2" if m in ("c2", "p2") else "bert"}
             for m, e in truth.items()}
    comparison = compare(named, truth, common_only=False, detector_kind="logistic")
    values = _values(comparison)
    assert values["auc_by_architecture.bert.score_auc"] == {"dbs": 1.0, "uat": 1.0}
    assert values["auc_by_architecture.gpt2.score_auc"] == {"dbs": 0.0, "uat": None}
    assert "| score AUC, architecture bert | 1.000 | 1.000 |" in markdown(comparison)
    assert "| logistic CV AUC, architecture gpt2 | - | - |" in markdown(comparison)
    assert not any(k.startswith("auc_by_split") for k in values)  # one split: no rows
    with pytest.raises(InputError, match="unknown detector 'svm'"):
        compare(named, truth, detector_kind="svm")


def test_bad_input(runs: Any, tmp_path: Path) -> None:
    named, truth = runs
    with pytest.raises(InputError, match="same name"):
        compare([named[0], (named[0][0], named[1][1])], truth)
    with pytest.raises(InputError, match="no results"):
        compare([], truth)
    with pytest.raises(InputError, match="not a campaign results directory"):
        compare([("x", tmp_path / "nowhere")], truth)
    with pytest.raises(InputError, match="every run"):
        compare(named, {"other": truth["c1"]})
