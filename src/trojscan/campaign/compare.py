"""Methods side by side: one table over the results of several campaign runs (say one per
inversion method) on the same zoo, like Tables 1 and 4 of the DBS paper.

Each results directory is measured against the zoo manifest by
:func:`trojscan.campaign.report.evaluate`; the table has the methods as columns and, as rows,
the models compared, scan errors, accuracy, precision, recall, ROC AUC of the score (in
units of ln(labels)), the accuracy of a threshold fitted per method (out of fold, seeded
stratified k-fold: the methods' scores have different scales, and the paper, too, fits each
method's bound), trigger recovery, target accuracy and mean seconds per model; where the
zoo has several attack splits (a VQA zoo: TIJO Table 2's rows) or architectures, the ROC AUC
of the score and of a cross-validated detector in each follow (each split's poisoned models
with every clean model, :func:`trojscan.campaign.report.auc_by_group`). By default
only the models that every run scanned (and the manifest has) count, so that each column is
measured on the same models; a model that failed in some run is then left out of all columns
and shows in that run's scan errors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trojscan.campaign.report import _table, evaluate, load_results
from trojscan.campaign.run import CAMPAIGN_FILE
from trojscan.detect import DETECTORS
from trojscan.errors import InputError
from trojscan.fsutil import atomic_write_json, atomic_write_text

COMPARE_VERSION = 1

#: (row key, row label, where in an :func:`evaluate` report the value is).
ROWS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("models", "models compared", ("n",)),
    ("errors", "scan errors", ("errors",)),
    ("accuracy", "accuracy", ("fixed", "accuracy")),
    ("precision", "precision", ("fixed", "precision")),
    ("recall", "recall", ("fixed", "recall")),
    ("roc_auc", "ROC AUC (score / ln labels)", ("roc_auc",)),
    ("cv_accuracy", "accuracy, threshold fitted (k-fold CV)", ("cross_validated", "accuracy")),
    ("trigger_recovery", "trigger recovered (any word)", ("trigger_recovery", "recovered")),
    ("target_accuracy", "target correct (poisoned)", ("target_accuracy", "poisoned")),
    ("seconds", "seconds per model (mean)", ("seconds", "mean")),
)


def _pick(report: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at ``path``; None where the report has none (cross-validation with fewer
    than 2 models of a class)."""
    value: Any = report
    for key in path:
        if key not in value:
            return None
        value = value[key]
    return value


#: The per-group AUC tables of an :func:`evaluate` report that become rows, and their names.
GROUPS = (("auc_by_split", "split"), ("auc_by_architecture", "architecture"))


def _group_rows(reports: Mapping[str, Mapping[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Rows of the score AUC and the cross-validated ``kind`` detector's AUC in each split
    and architecture, for the tables with at least two groups in some report."""
    rows = []
    for key, what in GROUPS:
        groups = sorted({g for r in reports.values() for g in r.get(key, {})})
        if len(groups) < 2:
            continue
        for group in groups:
            for field, label in (("score_auc", "score AUC"), ("cv_auc", f"{kind} CV AUC")):
                rows.append({"key": f"{key}.{group}.{field}",
                             "label": f"{label}, {what} {group}",
                             "values": {n: r.get(key, {}).get(group, {}).get(field)
                                        for n, r in reports.items()}})
    return rows


def compare(named_results: Sequence[tuple[str, Path]], truth: Mapping[str, Mapping[str, Any]],
            threshold: float | None = None, common_only: bool = True,
            detector_kind: str = "threshold") -> dict[str, Any]:
    """Measure each ``(name, results directory)`` against the manifest entries ``truth``
    (:func:`trojscan.manifest.load_truth`) and tabulate them.

    ``threshold`` None uses each record's own verdict; a number re-decides every model as
    trojaned when its score is under it (see :func:`evaluate`). ``common_only`` restricts every
    column to the models scanned in all runs. ``detector_kind`` (``threshold`` or
    ``logistic``) is the detector cross-validated per split and architecture. Returns a
    JSON-ready dict: ``methods`` (the names, in order), ``rows`` (key, label and a value
    per method, in table order), ``models`` (the ids compared when ``common_only``, else
    None) and ``reports`` (each run's full :func:`evaluate` report, per-model rows
    included).
    """
    names = [name for name, _ in named_results]
    if detector_kind not in DETECTORS:
        raise InputError(f"unknown detector {detector_kind!r}; expected "
                         f"{' or '.join(DETECTORS)}")
    if not names:
        raise InputError("nothing to compare: no results directories")
    if len(set(names)) != len(names):
        raise InputError(f"two results directories have the same name: {', '.join(names)}")
    loaded = {name: load_results(Path(path)) for name, path in named_results}
    common: list[str] | None = None
    if common_only:
        common = sorted(set(truth).intersection(*(records for records, _ in loaded.values())))
        if not common:
            raise InputError("no model was scanned in every run and is in the manifest")
    reports = {}
    for name, (records, errors) in loaded.items():
        kept = records if common is None else {m: records[m] for m in common}
        reports[name] = evaluate(kept, truth, detector_kind=detector_kind,
                                 threshold=threshold, errors=errors)
    rows = [{"key": key, "label": label,
             "values": {name: _pick(reports[name], path) for name in names}}
            for key, label, path in ROWS] + _group_rows(reports, detector_kind)
    return {"version": COMPARE_VERSION, "methods": names,
            "results": {name: str(path) for name, path in named_results},
            "threshold": threshold, "common_only": common_only, "models": common,
            "detector": detector_kind,
            "rows": rows, "reports": reports}


def run_names(results: Sequence[Path]) -> list[str]:
    """A column name per results directory: its campaign's method (``campaign.json``), or
    the directory's name where that is missing or two runs share a method."""
    methods = []
    for path in results:
        try:
            methods.append(json.loads((Path(path) / CAMPAIGN_FILE).read_text("utf-8"))["method"])
        except (OSError, ValueError, KeyError, TypeError):
            methods.append(None)
    if None in methods or len(set(methods)) != len(methods):
        return [Path(p).name for p in results]
    return methods


def markdown(comparison: Mapping[str, Any]) -> str:
    """The comparison as Markdown: one table, a column per method."""
    names = comparison["methods"]
    decided = ("each scan's own verdict" if comparison["threshold"] is None
               else f"score under {comparison['threshold']}")
    scope = ("the models every run scanned" if comparison["common_only"]
             else "every model each run scanned")
    lines = ["# Method comparison", "",
             f"Verdicts: {decided}. Models: {scope}.", ""]
    lines += _table(("metric", *names), [(row["label"], *(row["values"][n] for n in names))
                                         for row in comparison["rows"]])
    lines += ["Results:", ""] + [f"- {name}: `{comparison['results'][name]}`" for name in names]
    return "\n".join(lines) + "\n"


def write_comparison(comparison: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write ``compare.json`` and ``compare.md`` into ``out_dir`` (created if needed), each
    atomically; returns their paths."""
    out_dir = Path(out_dir)
    paths = [out_dir / "compare.json", out_dir / "compare.md"]
    atomic_write_json(paths[0], comparison)
    atomic_write_text(paths[1], markdown(comparison))
    return paths
