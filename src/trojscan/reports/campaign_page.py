"""The HTML page of a campaign (``trojscan campaign report`` writes it beside its Markdown):
the metrics tables, the ROC curve, and a row per model linking to that model's scan page
(``models/ID.html``, written too), the misses first."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from trojscan.campaign.report import MODEL_COLUMNS, summary_tables
from trojscan.campaign.run import MODELS_DIR
from trojscan.reports.charts import roc_chart
from trojscan.reports.render import render, write_page
from trojscan.reports.scan_page import Evidence, gather_evidence, scan_page
from trojscan.results import ScanResult

#: The campaign page's file in the report folder.
PAGE = "report.html"


def is_miss(row: Mapping[str, Any]) -> bool:
    """Whether a per-model row's verdict is wrong (a false negative or a false positive)."""
    return (row["verdict"] == "trojaned") != bool(row["truth"])


def campaign_page(report: Mapping[str, Any]) -> str:
    """The HTML page of a campaign report (:func:`trojscan.campaign.report.evaluate`): the
    headline metrics, the ROC, the models (misses first, each row linking to
    ``models/ID.html``), then the breakdowns."""
    rows = sorted(report["per_model"], key=lambda row: not is_miss(row))
    models = [{"href": f"{MODELS_DIR}/{row['model_id']}.html", "miss": is_miss(row),
               "cells": [row[c] for c in MODEL_COLUMNS]} for row in rows]
    headline, *tables = summary_tables(report)
    return render("campaign.html.j2", title="Campaign report", report=report,
                  headline=headline, tables=tables, roc_svg=roc_chart(report),
                  misses=sum(m["miss"] for m in models), models=models,
                  model_header=MODEL_COLUMNS,
                  failed=[(f["model_id"], f["error"]) for f in report["failed"]])


def write_campaign_pages(report: Mapping[str, Any], records: Mapping[str, ScanResult],
                         out_dir: Path, zoo: Path | None = None, device: str = "cpu",
                         allow_pickle: bool = False) -> list[Path]:
    """Write ``out_dir/report.html`` and a scan page per record, ``out_dir/models/ID.html``
    (with the zoo's model directories, ``zoo/ID``, their examples with and without the
    trigger); every page is rendered before any is written. Returns the campaign page and
    the model pages' folder."""
    out_dir = Path(out_dir)
    pages: dict[Path, str] = {}
    for model_id, record in sorted(records.items()):
        evidence: Evidence | None = None
        if zoo is not None and (Path(zoo) / model_id).is_dir():
            evidence = gather_evidence(record, Path(zoo) / model_id, device=device,
                                       allow_pickle=allow_pickle)
        pages[out_dir / MODELS_DIR / f"{model_id}.html"] = scan_page(
            replace(record, model_id=model_id), evidence, back=f"../{PAGE}")
    pages[out_dir / PAGE] = campaign_page(report)
    for path, html in pages.items():
        write_page(path, html)
    return [out_dir / PAGE, out_dir / MODELS_DIR]
