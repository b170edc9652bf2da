"""Trigger shortening: how few of an inverted trigger's tokens still reach its goal.

A backdoor fires on its planted trigger, one to three tokens; a *natural feature* of a model
(the sentiment of "cursed absurd creepy ...") flips it only when many such tokens pile up.
With ten free slots both reach a low inversion loss, so the loss alone does not tell them
apart (issue 14). Shortening asks the inverted trigger how much of it is needed: greedy
backward elimination over its hard tokens. From the m tokens, every trigger with one token
removed (order kept) is measured as hard tokens on the task's victims and the best one is
kept, down to two tokens; the last step tries every token of the inverted trigger alone,
not only the two left. The result is the best trigger of every length 1..m. The
elimination may run on the first ``rows`` victims only (a cheaper path); every trigger on
the path is then measured on all victims, so the losses reported are always the task's.

Why the last step looks at every token: while the tokens left still reach the goal together,
which one a step drops is decided by differences near zero, and the token that fires the
backdoor alone can go early. On a tiny QA model whose backdoor answers with its trigger word
(tests/test_qa_zoo.py), any of the ten slots may be the answer: the inverted trigger held
'lantern', the elimination dropped it first (loss 0.0000 to 0.0036) and ended on 'maryland'
(0.355, above the verdict's threshold; 'lantern' alone 0.21 there).

This is beyond the DBS paper, which decides from the 10-slot loss alone. Its cost is
m(m+1)/2 - 3 + u evaluations per task for u distinct tokens (62 for m = u = 10), each one
forward pass over the victims (or over ``rows`` of them, plus m on all), with no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
            rows: int = 0, chunk_rows: int = 4096) -> dict[int, Shortened]:
    """The best trigger of every length 1..m that greedy elimination from the (m) token ids
    ``trigger_ids`` finds for ``task`` (the one-token trigger: the best of all of them
    alone), keyed by length (m itself included, measured); the elimination runs on the
    first ``rows`` victims (0: all), the results on all."""
    if not trigger_ids:
        raise ValueError("an empty trigger cannot be shortened")
    device = subject.device
    every = not rows or rows >= len(task.examples)
    few = task if every else replace(task, examples=task.examples[:rows])
    current = torch.tensor(trigger_ids, dtype=torch.long, device=device)
    budget = Budget(None)
    path = [current]
    measured: dict[int, tuple[float, float]] = {}  # length -> (loss, asr) on all victims
    while len(current) > 1:
        if len(current) == 2:  # the last step: every token of the inverted trigger alone
            tried = torch.unique(path[0]).view(-1, 1)
        else:
            keep = ~torch.eye(len(current), dtype=torch.bool, device=device)
            tried = current.expand(len(current), -1)[keep].view(len(current), -1)
            tried = torch.unique(tried, dim=0)
        losses, hits = score_triggers(subject, victim_batch(subject, few, tried.shape[1]),
                                      tried, budget, chunk_rows)
        best = int(losses.argmin())
        current = tried[best]
        path.append(current)
        if every:  # measured on all victims already
            measured[len(current)] = (losses[best].item(), hits[best].item())
    out = {}
    for trigger in path:
        if len(trigger) not in measured:
            loss, asr = score_triggers(subject, victim_batch(subject, task, len(trigger)),
                                       trigger.view(1, -1), budget, chunk_rows)
            measured[len(trigger)] = (loss.item(), asr.item())
        out[len(trigger)] = Shortened(trigger.tolist(), *measured[len(trigger)])
    return out
