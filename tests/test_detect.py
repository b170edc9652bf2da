"""Detectors fitted on synthetic scan results (no models)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from testkit import scan_result
from trojscan.detect import (
    FEATURES,
    LogisticDetector,
    ThresholdDetector,
    apply_detector,
    features,
    load_detector,
    make_detector,
    save_detector,
)
from trojscan.errors import InputError
from trojscan.results import CandidateResult, ScanResult, ShortTrigger


def make_record(score: float, hard_asr: float = 0.5, runner_up: float | None = None,
                hard_loss: float | None = None, accepted: bool = False) -> ScanResult:
    """A scan result with the fields the detectors read: best candidate of loss ``score``,
    a runner-up candidate of loss ``runner_up`` (none if None) and a pre-run-only one."""
    best = {"loss": score, "hard_asr": hard_asr,
            "hard_loss": score if hard_loss is None else hard_loss, "accepted": accepted}
    candidates: list[dict[str, Any]] = [{"target": 1, "loss": score}]
    if runner_up is not None:
        candidates.append({"target": 0, "loss": runner_up})
    candidates.append({"target": 2, "prerun_loss": score / 10, "full_run": False})
    return scan_result(score, best=best, candidates=candidates)


TROJANED = [0.001, 0.003, 0.01]
CLEAN = [0.2, 0.5, 1.0]


def separable() -> tuple[list[ScanResult], list[int]]:
    records = ([make_record(s, hard_asr=0.95, runner_up=s * 50, accepted=True) for s in TROJANED]
               + [make_record(s, hard_asr=0.2, runner_up=s * 1.5) for s in CLEAN])
    return records, [1, 1, 1, 0, 0, 0]


def test_features_by_hand() -> None:
    record = make_record(0.01, hard_asr=0.75, runner_up=0.1, hard_loss=0.02, accepted=True)
    record.candidates.append(CandidateResult(3, "x", [0], "start", loss=0.5))
    got = features(record)
    assert list(got) == list(FEATURES)
    # Not shortened: the short features fall back to the best trigger's hard loss.
    assert got == pytest.approx({"log_loss": math.log(0.01), "hard_asr": 0.75,
                                 "log_hard_loss": math.log(0.02), "gap": math.log(10.0),
                                 "accepted": 1.0, "log_short_1": math.log(0.02),
                                 "log_short_2": math.log(0.02)})
    # Shortened: the lowest loss of each length over the candidates, whichever candidate.
    record.candidates[0].shortened = [ShortTrigger(1, [5], "a", 0.4, 0.5),
                                      ShortTrigger(2, [5, 6], "a b", 0.03, 1.0)]
    record.candidates[-1].shortened = [ShortTrigger(1, [7], "c", 0.2, 0.6)]
    got = features(record)
    assert got["log_short_1"] == pytest.approx(math.log(0.2))
    assert got["log_short_2"] == pytest.approx(math.log(0.03))
    assert record.shortest(1)[0] is record.candidates[-1] and record.shortest(3) is None
    alone = features(make_record(0.0))  # one fully-run candidate, loss clamped at 1e-6
    assert alone["gap"] == 0.0
    assert alone["log_loss"] == pytest.approx(math.log(1e-6))
    assert alone["accepted"] == 0.0


def test_threshold_detector_separates_and_cuts_between_classes() -> None:
    records, y = separable()
    detector = ThresholdDetector().fit(records, y)
    assert max(TROJANED) < detector.threshold < min(CLEAN)
    assert detector.threshold == pytest.approx(math.sqrt(0.01 * 0.2))  # log-space midpoint
    assert detector.predict(records).tolist() == y
    assert detector.trained_on == 6
    assert detector.slope > 0
    decision = detector.decision_function(records)
    assert decision == pytest.approx(math.log(detector.threshold) - np.log(TROJANED + CLEAN))


def test_detectors_read_losses_in_units_of_the_label_count() -> None:
    # A 5-label model's losses are divided by log2(5) = 2.32 before any detector reads them:
    # fitted on binary models, a threshold decides a 5-label model on the same scale as the
    # scan's own threshold (0.12 binary, 0.279 for 5 labels).
    records, y = separable()
    detector = ThresholdDetector().fit(records, y)
    five = tuple(f"label-{i}" for i in range(5))
    unit = math.log(5) / math.log(2)
    under = scan_result(detector.threshold * unit * 0.9, labels=five)
    over = scan_result(detector.threshold * unit * 1.1, labels=five)
    assert under.normalised_score == pytest.approx(detector.threshold * 0.9)
    assert detector.predict([under, over]).tolist() == [1, 0]
    assert features(under)["log_loss"] == pytest.approx(math.log(under.score / unit))
    binary = scan_result(0.2)
    assert binary.normalised_score == 0.2


def test_threshold_detector_breaks_ties_by_the_largest_margin() -> None:
    # sorted: 0.001 T, 0.01 C, 0.3 T, 1.0 C. Cutting after 0.001 or after 0.3 both get 3 of 4
    # right; the first cut's neighbours are 10x apart, the second's 3.3x: it wins.
    records = [make_record(s) for s in (0.001, 0.01, 0.3, 1.0)]
    detector = ThresholdDetector().fit(records, [1, 0, 1, 0])
    assert detector.threshold == pytest.approx(math.sqrt(0.001 * 0.01))


def test_threshold_probabilities_are_calibrated_and_monotone() -> None:
    records, y = separable()
    detector = ThresholdDetector().fit(records, y)
    grid = [make_record(s) for s in np.geomspace(1e-4, 10.0, 25)]
    proba = detector.predict_proba(grid)
    assert proba.shape == (25, 2)
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert np.all(np.diff(proba[:, 1]) < 0)  # higher loss, less likely trojaned
    at_threshold = detector.predict_proba([make_record(detector.threshold)])[0, 1]
    assert at_threshold == pytest.approx(0.5)
    assert np.array_equal(detector.predict(grid), (proba[:, 1] > 0.5).astype(int))


@pytest.mark.parametrize("kind", ["threshold", "logistic"])
def test_json_round_trip_gives_identical_probabilities(kind: str, tmp_path: Path) -> None:
    records, y = separable()
    records.append(make_record(0.05, hard_asr=0.6, runner_up=0.06))  # a hard case
    y.append(1)
    detector = make_detector(kind).fit(records, y)
    path = tmp_path / "detector.json"
    save_detector(detector, path)
    saved = json.loads(path.read_text())
    assert (saved["kind"], saved["version"], saved["trained_on"]) == (kind, 2, 7)
    loaded = load_detector(path)
    assert type(loaded) is type(detector)
    grid = [make_record(s, hard_asr=a, runner_up=s * 3) for s in (0.002, 0.04, 0.7)
            for a in (0.1, 0.9)]
    assert np.array_equal(loaded.predict_proba(records + grid),
                          detector.predict_proba(records + grid))


def test_logistic_detector_learns_a_separable_set() -> None:
    records, y = separable()
    detector = LogisticDetector().fit(records, y)
    proba = detector.predict_proba(records)
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert detector.predict(records).tolist() == y
    assert np.all(proba[:3, 1] > 0.5) and np.all(proba[3:, 1] < 0.5)
    saved = detector.to_dict()
    assert saved["features"] == list(FEATURES)
    assert len(saved["coef"]) == len(saved["means"]) == len(saved["scales"]) == len(FEATURES)
    assert saved["c"] == 1.0 and saved["class_weight"] == "balanced"


@pytest.mark.parametrize("kind", ["threshold", "logistic"])
def test_fit_needs_both_classes(kind: str) -> None:
    records, _ = separable()
    with pytest.raises(InputError, match="need both clean and trojaned"):
        make_detector(kind).fit(records, [0] * len(records))


def test_unknown_detector_kind() -> None:
    with pytest.raises(InputError, match="unknown detector 'forest'"):
        make_detector("forest")


def _saved_threshold(tmp_path: Path) -> dict[str, Any]:
    records, y = separable()
    path = tmp_path / "good.json"
    save_detector(ThresholdDetector().fit(records, y), path)
    return json.loads(path.read_text())


@pytest.mark.parametrize(("content", "problem"), [
    ("not json{", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ({"kind": "forest", "version": 1}, "unknown kind 'forest'"),
    ({"kind": "threshold", "version": 7}, "format version 7"),
    ({"drop": "slope"}, "lacks the field 'slope'"),
    ({"threshold": -1.0}, "threshold must be positive"),
    ({"slope": "steep"}, "malformed"),
])
def test_load_detector_rejects_bad_files(content: Any, problem: str, tmp_path: Path) -> None:
    path = tmp_path / "detector.json"
    if isinstance(content, dict):
        data = _saved_threshold(tmp_path)
        data.pop(content.pop("drop", None), None)
        content = json.dumps({**data, **content})
    path.write_text(content)
    with pytest.raises(InputError, match=problem) as caught:
        load_detector(path)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_load_detector_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read detector"):
        load_detector(tmp_path / "absent.json")


def test_logistic_detector_rejects_other_features(tmp_path: Path) -> None:
    records, y = separable()
    data = LogisticDetector().fit(records, y).to_dict()
    path = tmp_path / "detector.json"
    path.write_text(json.dumps({**data, "features": ["log_loss"]}))
    with pytest.raises(InputError, match="uses features log_loss"):
        load_detector(path)


def test_apply_detector_decides_and_records_its_probability(tmp_path: Path) -> None:
    records, y = separable()
    detector = ThresholdDetector().fit(records, y)
    suspicious = scan_result(0.03, threshold=0.01)  # over its scan's threshold, under the fit
    assert suspicious.verdict == "clean"
    decided = apply_detector(suspicious, detector, tmp_path / "d.json")
    assert decided.verdict == "trojaned" and decided.detector is not None
    assert decided.detector.kind == "threshold" and decided.detector.probability > 0.5
    assert decided.detector.path == str(tmp_path / "d.json")
    assert decided.to_dict()["detector"]["probability"] == decided.detector.probability
