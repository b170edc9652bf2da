"""The weight-analysis baseline of TrojVQA and TIJO's Table 2: a classifier on statistics of
each model's final layer, no inversion at all.

A backdoor makes its target answer special: the final layer's row of the target is trained on
every poisoned example. The baseline reads the weights of the output layer (the last 2-D
tensor of the weights file whose rows are the model's labels) without running the model and
describes it by label-count-free statistics (:data:`WEIGHT_FEATURES`); a standardised logistic
regression on them is cross-validated like the scan detectors (stratified k-fold), over all
models, per split (each attack's poisoned models with every clean model) and per
architecture. Weights are read from safetensors only (no code runs).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from trojscan.campaign.report import BREAKDOWNS, attack_type
from trojscan.errors import InputError
from trojscan.fsutil import atomic_write_json, atomic_write_text

#: The statistics of the output layer, in the order of the feature matrix.
WEIGHT_FEATURES = ("max_row_norm_z", "min_row_norm_z", "row_norm_cv", "max_bias_z",
                   "min_bias_z", "weight_std", "weight_kurtosis", "max_row_mean_z")


def _z(values: np.ndarray) -> np.ndarray:
    return (values - values.mean()) / (values.std() + 1e-12)


def output_layer(model_dir: Path, n_labels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The (labels, hidden) weight and (labels,) bias of the model's output layer: the last
    2-D tensor with ``n_labels`` rows in its safetensors files (in name order), and the 1-D
    tensor of the same name with ``bias`` for ``weight`` (None if absent)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise InputError(f"{model_dir} has no safetensors weights to analyse")
    found: tuple[Path, str, list[str]] | None = None
    try:
        for path in files:
            with safe_open(str(path), "np") as f:
                names = list(f.keys())
                rows = [n for n in names if len(f.get_slice(n).get_shape()) == 2
                        and f.get_slice(n).get_shape()[0] == n_labels]
                if rows:
                    found = (path, rows[-1], names)
        if found is None:
            raise InputError(f"{model_dir} has no output layer with {n_labels} rows")
        path, name, names = found
        with safe_open(str(path), "np") as f:
            weight = f.get_tensor(name).astype(np.float64)
            bias_name = name.removesuffix("weight") + "bias"
            bias = f.get_tensor(bias_name).astype(np.float64) if bias_name in names else None
    except (OSError, SafetensorError) as exc:
        raise InputError(f"cannot read the weights of {model_dir}: {exc}") from exc
    return weight, bias


def weight_features(model_dir: Path, n_labels: int) -> dict[str, float]:
    """:data:`WEIGHT_FEATURES` of one model: z-scores of the most and least extreme label's
    row norm, row mean and bias, the coefficient of variation of the row norms, and the
    spread and kurtosis of all the layer's weights."""
    weight, bias = output_layer(model_dir, n_labels)
    norms = np.linalg.norm(weight, axis=1)
    flat = weight.ravel()
    centred = flat - flat.mean()
    kurtosis = float((centred ** 4).mean() / (centred.var() ** 2 + 1e-24))
    bias_z = _z(bias) if bias is not None else np.zeros(n_labels)
    return {"max_row_norm_z": float(_z(norms).max()), "min_row_norm_z": float(_z(norms).min()),
            "row_norm_cv": float(norms.std() / (norms.mean() + 1e-12)),
            "max_bias_z": float(bias_z.max()), "min_bias_z": float(bias_z.min()),
            "weight_std": float(flat.std()), "weight_kurtosis": kurtosis,
            "max_row_mean_z": float(_z(weight.mean(1)).max())}


def _cv_auc(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> dict[str, Any]:
    smallest = min(int(np.sum(y == 1)), int(np.sum(y == 0)))
    k = min(folds, smallest)
    if k < 2:
        return {"n": len(y), "cv_auc": None,
                "note": f"the smaller class has {smallest} model(s)"}
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    proba = cross_val_predict(model, x, y, cv=StratifiedKFold(k, shuffle=True,
                                                              random_state=seed),
                              method="predict_proba")[:, 1]
    return {"n": len(y), "clean": int(np.sum(y == 0)), "poisoned": int(np.sum(y == 1)),
            "folds": k, "cv_auc": float(roc_auc_score(y, proba)),
            "accuracy": float(np.mean((proba >= 0.5) == y))}


def weight_analysis(zoo: Path, truth: Mapping[str, Mapping[str, Any]], folds: int = 5,
                    seed: int = 0) -> dict[str, Any]:
    """Cross-validated AUC of the weight-analysis classifier on every model of ``truth``
    with a directory in ``zoo``: over all, per split (:func:`attack_type`, with every clean
    model) and per architecture; plus each model's features."""
    ids = sorted(m for m in truth if (Path(zoo) / m).is_dir())
    if not ids:
        raise InputError(f"no model of the manifest is in {zoo}")
    rows = {m: weight_features(Path(zoo) / m, len(truth[m]["labels"])) for m in ids}
    x = np.array([[rows[m][f] for f in WEIGHT_FEATURES] for m in ids])
    y = np.array([int(truth[m]["poisoned"]) for m in ids])
    splits = np.array([attack_type(truth[m]) for m in ids])
    archs = np.array([BREAKDOWNS["architecture"](truth[m]) for m in ids])
    by_split = {s: _cv_auc(x[(splits == s) | (y == 0)], y[(splits == s) | (y == 0)], folds,
                           seed) for s in sorted(set(splits[y == 1].tolist()))}
    by_arch = {a: _cv_auc(x[archs == a], y[archs == a], folds, seed)
               for a in sorted(set(archs.tolist()))}
    return {"features": list(WEIGHT_FEATURES), "all": _cv_auc(x, y, folds, seed),
            "auc_by_split": by_split, "auc_by_architecture": by_arch,
            "models": {m: rows[m] for m in ids}}


def markdown(report: Mapping[str, Any]) -> str:
    """The weight-analysis AUCs as Markdown tables."""
    def table(groups: Mapping[str, Mapping[str, Any]], name: str) -> list[str]:
        lines = [f"| {name} | n | cross-validated AUC | note |", "|---|---|---|---|"]
        lines += [f"| {k} | {g['n']} | "
                  f"{'-' if g['cv_auc'] is None else format(g['cv_auc'], '.3f')} | "
                  f"{g.get('note') or ''} |" for k, g in groups.items()]
        return [*lines, ""]

    return "\n".join(["# Weight analysis (final layer statistics, logistic regression)", "",
                      *table({"all": report["all"]}, "models"),
                      "## By split (its poisoned models with every clean one)", "",
                      *table(report["auc_by_split"], "split"), "## By architecture", "",
                      *table(report["auc_by_architecture"], "architecture")])


def write_weight_report(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """``weights.json`` and ``weights.md`` in ``out_dir``, written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "weights.json", out_dir / "weights.md"]
    atomic_write_json(paths[0], report)
    atomic_write_text(paths[1], markdown(report))
    return paths


