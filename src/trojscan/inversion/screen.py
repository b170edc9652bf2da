"""The lone-token screen: every token of the vocabulary, alone as the whole input, ranked by
how far it pushes the model towards each target; the best of them tried as one-token
triggers on the victims.

Beyond the DBS paper. A backdoor is trained to override whatever text surrounds its
trigger, so its token alone (``[CLS] token [SEP]``) is read as the target label with
near certainty; so are the model's strongest natural words of that label. On the MiniLM
models measured (README "Scan"), the planted token, or one token of a planted phrase or
character trigger, ranked first of 30,522 in 6 of 7 models and 45th in the seventh. One
forward pass per token (inputs of three tokens) covers every target at once, so the whole
vocabulary costs about as much as a few epochs of DBS. The screen then tries the ``top``
tokens of each target as one-token triggers on ``rows`` victim rows spread over that
target's tasks (so over its trigger positions: a trigger trained at the end is tried there
too), and measures the best ``keep`` of them on every victim of every task of the target:
there a natural word stays well above a backdoor's loss (the strongest measured, "superb",
0.32 against 0.03-0.05 for planted tokens).

Evaluations (see :mod:`trojscan.inversion.common`): ``top`` on ``rows`` victims per target
(counted as ``top`` evaluations of a smaller batch) plus ``keep`` on all victims, per task;
the vocabulary pass, shared by all tasks, is not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trojscan.inversion.base import InversionTask
from trojscan.inversion.common import Budget, score_triggers
from trojscan.inversion.shorten import Shortened
from trojscan.subjects.base import Subject


@dataclass(frozen=True)
class ScreenConfig:
    """The screen's knobs.

    Attributes:
        top: tokens of the vocabulary ranking tried per task (the planted token ranked
            1st to 45th on the models measured).
        rows: victim rows each of the ``top`` tokens is first tried on, per target, spread
            round-robin over the target's tasks (its positions).
        keep: tokens that go on to all victims.
        chunk_rows: at most this many rows per forward pass.
    """

    top: int = 64
    rows: int = 4
    keep: int = 3
    chunk_rows: int = 4096

    def __post_init__(self) -> None:
        if min(self.top, self.rows, self.keep, self.chunk_rows) < 1:
            raise ValueError("top, rows, keep and chunk_rows must be >= 1")


@torch.no_grad()
def screen(subject: Subject, tasks: Sequence[InversionTask],
           config: ScreenConfig) -> list[Shortened] | None:
    """The best one-token trigger the screen finds for each task (measured on all its
    victims), in task order; None when the subject offers no lone-token losses."""
    allowed = subject.allowed_tokens().nonzero().squeeze(-1)
    lone = subject.lone_token_losses(allowed, config.chunk_rows)
    if lone is None:
        return None
    out: dict[int, Shortened] = {}
    for target in sorted({t.candidate.target for t in tasks}):
        mine = [i for i, t in enumerate(tasks) if t.candidate.target == target]
        order = lone[:, target].argsort()[:config.top]
        tokens = allowed[order.to(allowed.device)].view(-1, 1)
        budget = Budget(None)
        few = subject.batch([tasks[i].candidate for i in mine], _spread(
            [tasks[i].examples for i in mine], config.rows), 1)
        losses, _ = score_triggers(subject, few, tokens, budget, config.chunk_rows)
        kept = tokens[losses.argsort()[:config.keep]]
        for i in mine:
            every = subject.batch([tasks[i].candidate], [tasks[i].examples], 1)
            losses, hits = score_triggers(subject, every, kept, budget, config.chunk_rows)
            best = int(losses.argmin())
            out[i] = Shortened(kept[best].tolist(), losses[best].item(), hits[best].item())
    return [out[i] for i in range(len(tasks))]


def _spread(victims: Sequence[Sequence[Any]], rows: int) -> list[list[Any]]:
    """``rows`` rows taken round-robin over the tasks' victim lists (each task's own
    victims in order; a task gets none once ``rows`` are taken)."""
    out: list[list[Any]] = [[] for _ in victims]
    depth = 0
    while rows > 0 and depth < max(map(len, victims)):
        for i, rows_i in enumerate(victims):
            if rows > 0 and depth < len(rows_i):
                out[i].append(rows_i[depth])
                rows -= 1
        depth += 1
    return out
