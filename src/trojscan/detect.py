"""Detectors: turn scan results into a trojaned / clean decision, fitted on known models.

A scan decides alone, by comparing its lowest inversion loss with a fixed threshold (DBS
Eq. 4). On a zoo whose ground truth is known, a detector can instead be *fitted*:

* :class:`ThresholdDetector` keeps the DBS rule and only learns the loss threshold (the one
  that classifies the training models best) and a calibration of its margin into a
  probability;
* :class:`LogisticDetector` is a logistic regression on a few features of each record
  (:data:`FEATURES`, see :func:`features`).

Every loss a detector reads is first divided by
:func:`~trojscan.results.loss_unit` of the model's label count (ln(labels) / ln 2, the
scale of the scan's own threshold), so that one detector decides binary and 5-label
models alike: a trigger's cross-entropy competes with more labels on a model with more.

Both follow scikit-learn's conventions (``fit``, ``decision_function``, ``predict_proba``,
``predict``; label 1 = trojaned, 0 = clean) but take scan results
(:class:`~trojscan.results.ScanResult`), not feature matrices. They are saved as plain JSON
(:func:`save_detector`, :func:`load_detector`), never pickled; :func:`apply_detector` lets
one decide a scan.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from scipy.special import expit
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression

from trojscan.errors import InputError
from trojscan.fsutil import atomic_write_json, read_json
from trojscan.results import DetectorVerdict, ScanResult, loss_unit

DETECTOR_VERSION = 2
#: Losses are clamped to this before taking logs (a perfect trigger has loss ~0).
MIN_LOSS = 1e-6
#: Names of the features of :func:`features`, in the order of the feature matrix.
FEATURES = ("log_loss", "hard_asr", "log_hard_loss", "gap", "accepted", "log_short_1",
            "log_short_2")


def _log(loss: float) -> float:
    return math.log(max(float(loss), MIN_LOSS))


def features(record: ScanResult) -> dict[str, float]:
    """The features of one scan result (names and order as in :data:`FEATURES`); every
    loss in units of :func:`~trojscan.results.loss_unit` of the model's label count.

    * ``log_loss``: log of the lowest inversion loss of a full trigger over the
      candidates (DBS Eq. 4's score), clamped at :data:`MIN_LOSS`;
    * ``hard_asr``: attack success rate of the best trigger as hard tokens (0..1);
    * ``log_hard_loss``: log of the best trigger's loss as hard tokens, clamped likewise;
    * ``gap``: log of the runner-up candidate's loss minus log of the best one's, over the
      fully-run candidates (those with a ``loss``; a (victims, target) tried at several
      positions counts once, at its lowest); 0 when there is only one. A backdoor makes one
      target stand out; a clean model's targets are all about as hard;
    * ``accepted``: 1 when the best inversion met its acceptance test, else 0;
    * ``log_short_1``, ``log_short_2``: log of the lowest loss of an inverted trigger
      shortened to 1 and 2 tokens (:meth:`~trojscan.results.ScanResult.shortest`): a
      backdoor fires with one or two of its tokens, a natural feature needs many. A result
      without shortened triggers (``ScanConfig.shorten`` off, or written before it) gets
      ``log_hard_loss`` instead.
    """
    best, unit = record.best, loss_unit(len(record.labels))
    lowest: dict[tuple[int, tuple[int, ...]], float] = {}
    for c in record.candidates:  # one loss per hypothesis, whatever its position
        if c.loss is not None:
            key = (c.target, tuple(c.victims))
            lowest[key] = min(lowest.get(key, math.inf), c.loss / unit)
    losses = sorted(lowest.values())
    gap = _log(losses[1]) - _log(losses[0]) if len(losses) > 1 else 0.0
    shortest = {n: record.shortest(n) for n in (1, 2)}
    return {"log_loss": _log(losses[0] if losses else record.normalised_score),
            "hard_asr": float(best.hard_asr),
            "log_hard_loss": _log(best.hard_loss / unit), "gap": gap,
            "accepted": float(best.accepted),
            **{f"log_short_{n}": _log((found[1].loss if found else best.hard_loss) / unit)
               for n, found in shortest.items()}}


def feature_matrix(records: Sequence[ScanResult]) -> np.ndarray:
    """The (n, len(FEATURES)) matrix of :func:`features` of ``records``."""
    rows = [features(r) for r in records]
    return np.array([[row[name] for name in FEATURES] for row in rows], dtype=float)


def _log_scores(records: Sequence[ScanResult]) -> np.ndarray:
    return np.array([_log(r.normalised_score) for r in records], dtype=float)


def _labels(records: Sequence[ScanResult], y: Sequence[int] | np.ndarray) -> np.ndarray:
    """``y`` as an int array, checked against ``records``: 0/1, both classes present."""
    labels = np.asarray(y, dtype=int)
    if labels.shape != (len(records),):
        raise ValueError(f"{len(records)} records but {labels.size} labels")
    if not set(labels.tolist()) <= {0, 1}:
        raise ValueError("labels must be 0 (clean) or 1 (trojaned)")
    if len(set(labels.tolist())) < 2:
        raise InputError("need both clean and trojaned models to fit a detector")
    return labels


def _finite(values: Any, what: str) -> np.ndarray:
    """``values`` as a float array, every entry finite (ValueError otherwise)."""
    array = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} is not finite")
    return array


class Detector(ABC):
    """What every detector offers; probabilities and predictions come from the subclass's
    decision value and log-odds."""

    kind: ClassVar[str]
    #: Number of models it was fitted on; None until fitted.
    trained_on: int | None = None

    @abstractmethod
    def fit(self, records: Sequence[ScanResult], y: Sequence[int] | np.ndarray) -> Detector:
        """Fit on ``records`` with labels ``y`` (1 = trojaned, 0 = clean); returns self."""

    @abstractmethod
    def decision_function(self, records: Sequence[ScanResult]) -> np.ndarray:
        """Real-valued score per record, positive = trojaned."""

    @abstractmethod
    def _logit(self, records: Sequence[ScanResult]) -> np.ndarray:
        """Log-odds of trojaned per record."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (see :func:`save_detector`)."""

    @classmethod
    @abstractmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Detector:
        """Rebuild a detector from :meth:`to_dict`'s output (KeyError / ValueError if bad)."""

    def predict_proba(self, records: Sequence[ScanResult]) -> np.ndarray:
        """(n, 2) array: probability of clean, probability of trojaned."""
        trojaned = expit(self._logit(records))
        return np.column_stack([1.0 - trojaned, trojaned])

    def predict(self, records: Sequence[ScanResult]) -> np.ndarray:
        """1 (trojaned) where the decision value is positive, else 0."""
        return (self.decision_function(records) > 0).astype(int)

    def _check_fitted(self) -> None:
        if self.trained_on is None:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet")

    def _header(self) -> dict[str, Any]:
        self._check_fitted()
        return {"kind": self.kind, "version": DETECTOR_VERSION, "trained_on": self.trained_on}


class ThresholdDetector(Detector):
    """The DBS rule with a learnt threshold: trojaned when the score (normalised by the
    label count, :attr:`~trojscan.results.ScanResult.normalised_score`) is under it; the
    threshold is in a binary model's units.

    ``fit`` tries every cut between two neighbouring distinct training scores (at their
    midpoint in log space) and the two cuts outside them (everything clean, everything
    trojaned), and keeps the one with the highest training accuracy; among equally accurate
    cuts, the one with the widest gap between its neighbours (the largest margin), the
    outer cuts counting as margin 0.

    The decision value is ``log(threshold) - log(score)``. Its probability is a logistic of
    it, ``sigmoid(slope * decision)``, whose one slope is fitted on the training models by
    a logistic regression without intercept (L2 strength ``1 / calibration_c``), so 0.5 stays
    at the threshold.
    """

    kind = "threshold"

    def __init__(self, calibration_c: float = 1.0) -> None:
        self.calibration_c = calibration_c
        self.threshold: float | None = None
        self.slope: float | None = None

    def fit(self, records: Sequence[ScanResult],
            y: Sequence[int] | np.ndarray) -> ThresholdDetector:
        """Learn the threshold and the slope from ``records`` and their labels ``y``."""
        labels = _labels(records, y)
        scores = _log_scores(records)
        distinct = np.unique(scores)
        cuts = [(distinct[0] - 1.0, 0.0), (distinct[-1] + 1.0, 0.0)]
        cuts += [((lo + hi) / 2, hi - lo) for lo, hi in pairwise(distinct)]
        cut, _ = max(cuts, key=lambda c: (int(np.sum((scores < c[0]) == labels)), c[1]))
        self.threshold = math.exp(cut)
        decision = (cut - scores).reshape(-1, 1)
        model = LogisticRegression(C=self.calibration_c, fit_intercept=False).fit(decision, labels)
        self.slope = float(model.coef_[0, 0])
        self.trained_on = len(records)
        return self

    def decision_function(self, records: Sequence[ScanResult]) -> np.ndarray:
        """``log(threshold) - log(score)`` per record (positive = trojaned)."""
        self._check_fitted()
        return math.log(self.threshold) - _log_scores(records)

    def _logit(self, records: Sequence[ScanResult]) -> np.ndarray:
        return self.slope * self.decision_function(records)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (see :func:`save_detector`)."""
        return {**self._header(), "threshold": self.threshold, "slope": self.slope,
                "calibration_c": self.calibration_c}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ThresholdDetector:
        """Rebuild a detector from :meth:`to_dict`'s output (KeyError / ValueError if bad)."""
        detector = cls(float(_finite(data["calibration_c"], "calibration_c")))
        detector.threshold = float(_finite(data["threshold"], "threshold"))
        if detector.threshold <= 0:
            raise ValueError("threshold must be positive")
        detector.slope = float(_finite(data["slope"], "slope"))
        detector.trained_on = int(data["trained_on"])
        return detector


class LogisticDetector(Detector):
    """Logistic regression on the standardised :data:`FEATURES` of the records.

    scikit-learn's ``LogisticRegression`` with L2 strength ``1 / c``, classes weighted to
    balance (``class_weight="balanced"``: a zoo may hold many more clean models than
    trojaned ones, or the reverse) and at most ``max_iter`` solver iterations. Features are
    standardised with the training means and standard deviations (a constant feature keeps
    scale 1). The decision value is the log-odds ``z @ coef + intercept``, computed here from
    the stored numbers, so a detector read back from JSON gives the very same probabilities.
    """

    kind = "logistic"

    def __init__(self, c: float = 1.0, max_iter: int = 1000) -> None:
        self.c = c
        self.max_iter = max_iter
        self.coef: np.ndarray | None = None
        self.intercept: float | None = None
        self.means: np.ndarray | None = None
        self.scales: np.ndarray | None = None

    def _standardise(self, records: Sequence[ScanResult]) -> np.ndarray:
        return (feature_matrix(records) - self.means) / self.scales

    def fit(self, records: Sequence[ScanResult], y: Sequence[int] | np.ndarray) -> LogisticDetector:
        """Standardise the features of ``records`` and fit the regression to labels ``y``."""
        labels = _labels(records, y)
        matrix = feature_matrix(records)
        self.means = matrix.mean(axis=0)
        scales = matrix.std(axis=0)
        self.scales = np.where(scales > 0, scales, 1.0)
        model = LogisticRegression(C=self.c, class_weight="balanced", max_iter=self.max_iter)
        model.fit((matrix - self.means) / self.scales, labels)
        self.coef = model.coef_[0].astype(float)
        self.intercept = float(model.intercept_[0])
        self.trained_on = len(records)
        return self

    def decision_function(self, records: Sequence[ScanResult]) -> np.ndarray:
        """Log-odds of trojaned per record (positive = trojaned)."""
        self._check_fitted()
        return self._standardise(records) @ self.coef + self.intercept

    def _logit(self, records: Sequence[ScanResult]) -> np.ndarray:
        return self.decision_function(records)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (see :func:`save_detector`)."""
        return {**self._header(), "features": list(FEATURES), "c": self.c,
                "class_weight": "balanced", "max_iter": self.max_iter,
                "coef": self.coef.tolist(), "intercept": self.intercept,
                "means": self.means.tolist(), "scales": self.scales.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LogisticDetector:
        """Rebuild a detector from :meth:`to_dict`'s output (KeyError / ValueError if bad)."""
        if list(data["features"]) != list(FEATURES):
            raise ValueError(f"it uses features {', '.join(map(str, data['features']))}; this "
                             f"trojscan computes {', '.join(FEATURES)}")
        detector = cls(float(_finite(data["c"], "c")), int(data["max_iter"]))
        shape = (len(FEATURES),)
        for name in ("coef", "means", "scales"):
            array = _finite(data[name], name)
            if array.shape != shape:
                raise ValueError(f"{name} must hold {len(FEATURES)} numbers")
            setattr(detector, name, array)
        if np.any(detector.scales <= 0):
            raise ValueError("scales must be positive")
        detector.intercept = float(_finite(data["intercept"], "intercept"))
        detector.trained_on = int(data["trained_on"])
        return detector


#: Detector classes by kind.
DETECTORS: dict[str, type[Detector]] = {
    "threshold": ThresholdDetector, "logistic": LogisticDetector}


def make_detector(kind: str) -> Detector:
    """A new, unfitted detector of ``kind`` (``threshold`` or ``logistic``), default settings."""
    if kind not in DETECTORS:
        raise InputError(f"unknown detector {kind!r}; expected {' or '.join(DETECTORS)}")
    return DETECTORS[kind]()


def save_detector(detector: Detector, path: Path) -> None:
    """Write a fitted detector to ``path`` as JSON (atomically): its ``kind``, the format
    ``version``, ``trained_on`` (models it was fitted on) and its parameters."""
    atomic_write_json(Path(path), detector.to_dict())


def load_detector(path: Path) -> Detector:
    """Read a detector written by :func:`save_detector`; an unreadable, malformed or
    unknown one is an :class:`InputError` naming the file."""
    data = read_json(Path(path), "detector")
    if not isinstance(data, dict):
        raise InputError(f"detector {path} is not a JSON object")
    kind = data.get("kind")
    if kind not in DETECTORS:
        raise InputError(f"detector {path} has unknown kind {kind!r}; expected "
                         f"{' or '.join(DETECTORS)}")
    if data.get("version") != DETECTOR_VERSION:
        raise InputError(f"detector {path} has format version {data.get('version')!r}; this "
                         f"trojscan reads version {DETECTOR_VERSION}")
    try:
        return DETECTORS[kind].from_dict(data)
    except KeyError as exc:
        raise InputError(f"detector {path} lacks the field {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise InputError(f"detector {path} is malformed: {exc}") from exc


def apply_detector(result: ScanResult, detector: Detector,
                   source: Path | None = None) -> ScanResult:
    """``result`` decided by a fitted detector instead of the threshold: its probability of
    "trojaned" is recorded, and the verdict is trojaned when it is >= 0.5."""
    probability = float(detector.predict_proba([result])[0, 1])
    return replace(result, verdict="trojaned" if probability >= 0.5 else "clean",
                   detector=DetectorVerdict(detector.kind, probability,
                                            None if source is None else str(source)))
