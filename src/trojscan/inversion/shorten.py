"""Trigger shortening: how few of an inverted trigger's tokens still reach its goal.

A backdoor fires on its planted trigger, one to three tokens; a *natural feature* of a model
(the sentiment of "cursed absurd creepy ...") flips it only when many such tokens pile up.
With ten free slots both reach a low inversion loss, so the loss alone does not tell them
apart (issue 14). Shortening asks the inverted trigger how much of it is needed: greedy
backward elimination over its hard tokens. From the m tokens, every trigger with one token
removed (order kept) is measured as hard tokens on the task's victims and the best one is
kept, down to one token. The result is the best trigger of every length 1..m.

This is beyond the DBS paper, which decides from the 10-slot loss alone. Its cost is
m(m+1)/2 - 1 evaluations per task (54 for m = 10), each one forward pass over the victims,
with no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trojscan.inversion.base import InversionTask
from trojscan.inversion.common import Budget, score_triggers, victim_batch
from trojscan.subjects.base import Subject


@dataclass(frozen=True)
class Shortened:
    """The best trigger of one length found by elimination.

    Attributes:
        trigger_ids: its token ids, in the order they had in the inverted trigger.
        loss: its hard-token goal loss on the task's victims (mean over the rows).
        asr: the fraction of the victims it flips.
    """

    trigger_ids: list[int]
    loss: float
    asr: float


@torch.no_grad()
def shorten(subject: Subject, task: InversionTask, trigger_ids: list[int],
            chunk_rows: int = 4096) -> dict[int, Shortened]:
    """The best trigger of every length 1..m that greedy elimination from the (m) token ids
    ``trigger_ids`` finds for ``task``, keyed by length (m itself included, measured)."""
    if not trigger_ids:
        raise ValueError("an empty trigger cannot be shortened")
    device = subject.device
    current = torch.tensor(trigger_ids, dtype=torch.long, device=device)
    budget = Budget(None)
    loss, asr = score_triggers(subject, victim_batch(subject, task, len(current)),
                               current.view(1, -1), budget, chunk_rows)
    out = {len(current): Shortened(current.tolist(), loss.item(), asr.item())}
    while len(current) > 1:
        keep = ~torch.eye(len(current), dtype=torch.bool, device=device)
        tried = current.expand(len(current), -1)[keep].view(len(current), -1)
        tried = torch.unique(tried, dim=0)
        losses, hits = score_triggers(subject, victim_batch(subject, task, tried.shape[1]),
                                      tried, budget, chunk_rows)
        best = int(losses.argmin())
        current = tried[best]
        out[len(current)] = Shortened(current.tolist(), losses[best].item(), hits[best].item())
    return out
