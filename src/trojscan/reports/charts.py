"""The charts of the HTML reports, as inline SVG: a scan's per-candidate losses, its best
inversion's loss and temperature trajectory with its events (DBS Figure 3), and a
campaign's ROC."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from markupsafe import Markup

from trojscan.campaign.report import roc_figure
from trojscan.results import CandidateResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Candidates a loss chart shows at most (the lowest losses; the table has them all).
MAX_BARS = 40
#: The colour of each trajectory event (DBS: focus, accept, rollback; K-Arm's drop; stops).
EVENT_COLOURS = {"accept": "#2a9d3a", "focus": "#1f6fd1", "rollback": "#d1391f",
                 "drop": "#8a8a8a", "stop": "#000000", "final": "#9b59b6"}


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasSVG(figure)
    return figure


def svg(figure: Figure) -> Markup:
    """``figure`` as an inline ``<svg>`` element (text kept as text, no XML prologue)."""
    from matplotlib import rc_context

    buffer = io.StringIO()
    with rc_context({"svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg",
                       metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    return Markup(text[text.index("<svg"):])


def png_data_url(data: bytes) -> str:
    """PNG bytes as a ``data:`` URL for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def candidate_name(candidate: CandidateResult, labels: Sequence[str]) -> str:
    """A candidate as ``victims -> target @ position``."""
    victims = ", ".join(labels[v] if v < len(labels) else str(v) for v in candidate.victims)
    return f"{victims} -> {candidate.target_name} @ {candidate.position}"


def candidate_loss(candidate: CandidateResult) -> float | None:
    """The loss a candidate is ranked by: its inversion's, or its pre-run's when the pre-run
    dropped it."""
    return candidate.loss if candidate.loss is not None else candidate.prerun_loss


def loss_chart(candidates: Sequence[CandidateResult], labels: Sequence[str],
               best: CandidateResult | None) -> Markup:
    """Horizontal bars of the candidates' losses, the lowest first (at most
    :data:`MAX_BARS`); the best candidate's bar is highlighted, pre-run-only losses are
    hatched."""
    ranked = sorted((c for c in candidates if candidate_loss(c) is not None),
                    key=lambda c: candidate_loss(c) or 0.0)[:MAX_BARS]
    figure = _figure(7, 1.2 + 0.28 * max(len(ranked), 1))
    axes = figure.add_subplot()
    names = [candidate_name(c, labels) for c in ranked]
    values = [candidate_loss(c) or 0.0 for c in ranked]
    colours = ["#d1391f" if c is best else "#4c78a8" for c in ranked]
    bars = axes.barh(range(len(ranked)), values, color=colours)
    for bar, candidate in zip(bars, ranked, strict=True):
        if candidate.loss is None:
            bar.set_hatch("//")
            bar.set_alpha(0.5)
    axes.set_yticks(range(len(ranked)), names, fontsize=8)
    axes.invert_yaxis()
    shown = "" if len(ranked) == len(candidates) else f" (the {len(ranked)} lowest)"
    axes.set(xlabel="loss (hatched: pre-run only)", title=f"Loss per candidate{shown}")
    return svg(figure)


def trajectory_chart(trajectory: Sequence[Mapping[str, Any]]) -> Markup | None:
    """The best inversion's loss per epoch (log scale) and, when recorded, its temperature
    on a second axis, with a marker per event (focus, accept, rollback, ...): DBS Figure 3.
    None for an empty trajectory."""
    steps = [s for s in trajectory if isinstance(s.get("loss"), int | float)
             and math.isfinite(s["loss"])]
    if not steps:
        return None
    figure = _figure(7, 3.6)
    axes = figure.add_subplot()
    epochs = [s.get("epoch", k) for k, s in enumerate(steps)]
    losses = [s["loss"] for s in steps]
    axes.plot(epochs, losses, color="#4c78a8", label="loss")
    if min(losses) > 0:
        axes.set_yscale("log")
    axes.set(xlabel="epoch", ylabel="loss", title="Inversion of the best candidate")
    for event, colour in EVENT_COLOURS.items():
        at = [(e, s["loss"]) for e, s in zip(epochs, steps, strict=True)
              if s.get("event") == event]
        if at:
            axes.scatter(*zip(*at, strict=True), color=colour, s=22, zorder=3, label=event)
    handles, names = axes.get_legend_handles_labels()
    temperature = [(e, s["temperature"]) for e, s in zip(epochs, steps, strict=True)
                   if isinstance(s.get("temperature"), int | float)]
    if temperature:
        twin = axes.twinx()
        line = twin.plot(*zip(*temperature, strict=True), color="#e39c28", linestyle="--",
                         label="temperature")
        if min(t for _, t in temperature) > 0:
            twin.set_yscale("log")
        twin.set_ylabel("temperature")
        handles, names = [*handles, *line], [*names, "temperature"]
    axes.legend(handles, names, loc="upper right", fontsize=8)
    return svg(figure)


def roc_chart(report: Mapping[str, Any]) -> Markup:
    """A campaign's ROC (:func:`trojscan.campaign.report.roc_figure`) as inline SVG."""
    return svg(roc_figure(report))
