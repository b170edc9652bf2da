"""The lone-token screen: every token of the vocabulary, alone as the whole input, ranked by
how far it pushes the model towards each target; the best of them tried as one-token
triggers on the victims.

Beyond the DBS paper. A backdoor is trained to override whatever text surrounds its
trigger, so its token alone (``[CLS] token [SEP]``) is read as the target label with
near certainty; so are the model's strongest natural words of that label. On the MiniLM
models measured (README "Scan"), the planted token, or one token of a planted phrase or
character trigger, ranked first of 30,522 in 6 of 7 universal backdoors and 45th in the
seventh; the token of a label-specific backdoor (trained to flip one label only, and to
leave the others alone) ranked 50th, 57th and 125th on three BBC models. One forward pass
per token (inputs of three tokens) covers every target at once, so the whole vocabulary
costs about as much as a few epochs of DBS.

Every task (a candidate: victims -> target, at a position or
:data:`~trojscan.subjects.base.SPREAD`) then goes through three cheap stages. The ``top``
tokens of its target are tried as one-token triggers on ``rows`` victim rows per target,
taken in turn from the target's tasks (so one from each label-specific pair's victim label)
and spread over the positions; each task keeps the ``keep`` tokens that did best on the rows
among its own victims. Those are measured on all its victims (spread too), and the best
token of the ``resolve`` best tasks at each position the task stands for. A task's result
is its best token where it does best: there a natural word stays well above a backdoor's
loss (the strongest measured on a sentiment model, "superb", 0.32 against 0.03-0.05 for
planted tokens; on BBC the best natural pair 0.35 against 0.08-0.14).

A family whose tokens say nothing alone (an NER tagger: a word alone tells nothing about
another word's tag; ``Subject.context_screen``) ranks them in context instead: for each
task, HotFlip's first-order ranking on its first ``rows`` victims from each of a few
starting tokens, ``context_top`` from each, measured as one-token triggers on those victims
cut to their compact form (an NER victim: its first victim entity alone, about 6 tokens);
the ``keep`` best go on to all its victims as above. Without it an NER scan's pre-run
picked what DBS inverts, and dropped a planted pair ranked 11th of 46.

Evaluations (see :mod:`trojscan.inversion.common`): ``top`` per target (on ``rows`` rows),
``keep`` per task on all its victims and one per position of a resolved task; with
``gradient``, for each of the ``resolve`` best tasks one forward and backward pass and
``gradient`` tokens on all its victims. The vocabulary pass, shared by all tasks, is not
counted. In context, per task and position: one forward and backward pass per init and
the ranked tokens (at most ``context_top`` per init) on the compact rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trojscan.inversion.base import InversionTask
from trojscan.inversion.common import (
    Budget,
    best_position,
    flip_candidates,
    score_rows,
    score_triggers,
)
from trojscan.inversion.shorten import Shortened
from trojscan.subjects.base import SPREAD, Candidate, Subject


@dataclass(frozen=True)
class ScreenConfig:
    """The screen's knobs.

    Attributes:
        top: tokens of the vocabulary ranking tried per target (the planted token ranked
            1st to 125th on the models measured).
        rows: victim rows per target the ``top`` tokens are first tried on, taken in turn
            from the target's tasks (a label-specific pair's own victims first) and spread
            over the positions (row k at position k mod 4); a task scores a token by the
            rows among its victims.
        keep: tokens per task that go on to all its victims.
        resolve: tasks, the best by then, whose token is also measured at each position (a
            task searched over spread rows); the others keep their spread measurement.
        gradient: for the ``resolve`` best tasks, tokens from a first-order ranking in
            context (HotFlip's step, as UAT's: the gradient of the goal loss on all the
            task's victims, the trigger slot holding its best token so far), each tried on
            those victims; the task keeps the best token of all; 0: none. A
            label-specific trigger fires only inside its victims' text, so alone it can
            rank low (on a tiny 5-label BERT: below the top 128 alone, first in context);
            on MiniLM the first-order rank of the planted token was in the thousands.
        by_position: order the tasks for the ``gradient`` and ``resolve`` steps by their
            tokens' loss at the best single position (each token's mean over the victim
            rows at each position), not over all a spread task's rows. A token that fires
            at one position only (a causal GPT-2 reads a start trigger only at the start)
            has a spread mean near the clean loss and its task was never resolved: a GPT-2
            BBC model whose planted 'copper' flips its victims at the start with loss
            0.005 was scanned clean (README "Scan"). The same forward passes; the task's
            record stays its spread measurement until resolved.
        chunk_rows: at most this many rows per forward pass.
        context_top: for a family whose tokens say nothing alone (``context_screen``: an
            NER tagger), tokens of each task's first-order ranking on its first ``rows``
            victims kept per init, then measured on those victims in compact form (the
            planted token of the WNUT-16 taggers ranked 1st-17th from one init or the
            other, README "NER taggers and QA models").
        context_inits: the tokens (as text) each in-context ranking starts from, one
            first-order ranking each: the gradient at a single point ranks a planted token
            first from one and in the thousands from another (on the WNUT-16 taggers
            'plume' 1st from 'the', 24,116th from [MASK]; 'cedar' 17th and 125th).
    """

    top: int = 128
    rows: int = 4
    keep: int = 3
    resolve: int = 4
    gradient: int = 0
    by_position: bool = True
    chunk_rows: int = 4096
    context_top: int = 32
    context_inits: tuple[str, ...] = ("[MASK]", "the")

    def __post_init__(self) -> None:
        if min(self.top, self.rows, self.keep, self.resolve, self.chunk_rows,
               self.context_top) < 1:
            raise ValueError("top, rows, keep, resolve, chunk_rows and context_top must "
                             "be >= 1")
        if not self.context_inits:
            raise ValueError("context_inits needs at least one token")
        object.__setattr__(self, "context_inits", tuple(self.context_inits))
        if self.gradient < 0:
            raise ValueError("gradient must be >= 0")


@dataclass(frozen=True)
class Screened:
    """A task's screen result: its candidate at the position where the token did best
    (or as it is: a task with a position, or a spread one not resolved), and the token as
    a one-token trigger there."""

    candidate: Candidate
    trigger: Shortened


@torch.no_grad()
def screen(subject: Subject, tasks: Sequence[InversionTask],
           config: ScreenConfig) -> list[Screened] | None:
    """The best one-token trigger the screen finds for each task, in task order; None when
    the subject offers neither lone-token losses nor the in-context ranking."""
    mask = subject.allowed_tokens()
    allowed = mask.nonzero().squeeze(-1)
    lone = subject.lone_token_losses(allowed, config.chunk_rows)
    if lone is None and not subject.context_screen:
        return None
    budget = Budget(None)
    kept = (_kept_in_context(subject, tasks, config, mask, budget) if lone is None
            else _kept_alone(subject, tasks, config, allowed, lone, budget))
    found: list[tuple[float, float, int, Candidate]] = []
    rank: list[float] = []  # what orders the tasks for the gradient and resolve steps
    for i, task in enumerate(tasks):
        every = subject.batch([task.candidate], [task.examples], 1)
        per_row, hit_rows = score_rows(subject, every, kept[i], budget, config.chunk_rows)
        losses, hits = per_row.mean(1), hit_rows.mean(1)
        best = int(losses.argmin())
        found.append((losses[best].item(), hits[best].item(), int(kept[i][best]),
                      task.candidate))
        rank.append(_best_at_a_position(subject, task, per_row) if config.by_position
                    else losses[best].item())
    order = sorted(range(len(tasks)), key=rank.__getitem__)
    if config.gradient:
        for i in order[:config.resolve]:
            every = subject.batch([tasks[i].candidate], [tasks[i].examples], 1)
            with torch.enable_grad():
                flips, _ = flip_candidates(subject, every, torch.tensor(
                    [found[i][2]], device=subject.device), mask, config.gradient)
            losses, hits = score_triggers(subject, every, flips.view(-1, 1), budget,
                                          config.chunk_rows)
            best = int(losses.argmin())
            if losses[best].item() < found[i][0]:
                found[i] = (losses[best].item(), hits[best].item(), int(flips[0, best]),
                            tasks[i].candidate)
                rank[i] = min(rank[i], found[i][0])
        order = sorted(range(len(tasks)), key=rank.__getitem__)
    for i in order[:config.resolve]:
        if tasks[i].candidate.position != SPREAD:
            continue
        loss, asr, where = best_position(subject, tasks[i], [found[i][2]], budget,
                                         config.chunk_rows)
        found[i] = (loss, asr, found[i][2], where)
    return [Screened(c, Shortened([token], loss, asr)) for loss, asr, token, c in found]


def _kept_alone(subject: Subject, tasks: Sequence[InversionTask], config: ScreenConfig,
                allowed: torch.Tensor, lone: torch.Tensor,
                budget: Budget) -> dict[int, torch.Tensor]:
    """Each task's ``keep`` tokens from the lone-token ranking: its target's ``top``
    tokens tried on ``rows`` victim rows taken in turn from the target's tasks, a task
    scoring them on the rows among its own victims."""
    kept: dict[int, torch.Tensor] = {}
    for target in sorted({t.candidate.target for t in tasks}):
        mine = sorted((i for i, t in enumerate(tasks) if t.candidate.target == target),
                      key=lambda i: len(tasks[i].candidate.victims))
        tokens = allowed[lone[:, target].argsort()[:config.top].to(allowed.device)]
        rows = _in_turn([tasks[i].examples for i in mine], config.rows)
        # The rows at the first task's position (spread over all positions for a spread
        # task); the batch takes only its target and position from it.
        batch = subject.batch([tasks[mine[0]].candidate], [rows], 1)
        per_row, _ = score_rows(subject, batch, tokens.view(-1, 1), budget, config.chunk_rows)
        for i in mine:
            own = [r for r, e in enumerate(rows) if any(e is v for v in tasks[i].examples)]
            score = per_row[:, own].mean(1) if own else per_row.mean(1)
            kept[i] = tokens[score.argsort()[:config.keep]].view(-1, 1)
    return kept


def _kept_in_context(subject: Subject, tasks: Sequence[InversionTask], config: ScreenConfig,
                     mask: torch.Tensor, budget: Budget) -> dict[int, torch.Tensor]:
    """Each task's ``keep`` tokens for a family whose tokens say nothing alone (an NER
    tagger): HotFlip's first-order ranking on its first ``rows`` victims at each position
    the task stands for, with each of the ``context_inits`` tokens in the slot,
    ``context_top`` tokens from each, measured as one-token triggers on the same victims cut
    to their compact form (:meth:`~trojscan.subjects.base.Subject.compact_victims`) at each
    of those positions; a token's score is its mean loss where it does best (a trigger
    planted next to its victim fires there only: on rows spread over the positions the
    WNUT-16 tagger's 'cedar' was lost among tokens that fire a little everywhere)."""
    inits = [ids[0] for text in config.context_inits if (ids := subject.token_ids(text))]
    kept: dict[int, torch.Tensor] = {}
    for i, task in enumerate(tasks):
        rows = list(task.examples[:config.rows])
        compact = subject.compact_victims(rows, task.candidate)
        places = subject.concrete(task.candidate)
        ranked = []
        for where in places:
            batch = subject.batch([where], [rows], 1)
            for init in inits:
                with torch.enable_grad():
                    flips, _ = flip_candidates(subject, batch, torch.tensor(
                        [init], device=subject.device), mask, config.context_top)
                ranked.append(flips[0])
            budget.spend(len(inits))
        tokens = torch.unique(torch.cat(ranked))
        score = torch.stack([score_rows(subject, subject.batch([where], [compact], 1),
                                        tokens.view(-1, 1), budget, config.chunk_rows)[0].mean(1)
                             for where in places]).min(0).values
        kept[i] = tokens[score.argsort()[:config.keep]].view(-1, 1)
    return kept


def _best_at_a_position(subject: Subject, task: InversionTask, per_row: torch.Tensor) -> float:
    """The lowest loss of any of a task's tokens at any one position: each token's (K, rows)
    losses averaged over the rows at each position its candidate's rows take (one, or all
    four of a spread one), the minimum over tokens and positions."""
    where = subject.row_positions(task.candidate, per_row.shape[1])
    return min(per_row[:, [r for r, p in enumerate(where) if p == position]].mean(1).min().item()
               for position in dict.fromkeys(where))


def _in_turn(victims: Sequence[Sequence[Any]], rows: int) -> list[Any]:
    """``rows`` distinct examples taken in turn from the tasks' victim lists (each list in
    order; an example already taken is skipped)."""
    out: list[Any] = []
    depth = 0
    while len(out) < rows and depth < max(map(len, victims)):
        for examples in victims:
            if len(out) < rows and depth < len(examples) and not any(
                    examples[depth] is e for e in out):
                out.append(examples[depth])
        depth += 1
    return out
