"""What the baseline inverters (UAT, ASCC, genetic search, T-Miner) share.

The unit of their evaluation budgets: one **evaluation** is one forward pass of the subject over
the victim rows of one task in use at that step (all of them, or UAT's minibatch), each row
with the one trigger being evaluated (for T-Miner, each with its generated rewrite), with or
without a backward pass. Scoring 300 candidate triggers on 20 victims is 300 evaluations
(6,000 rows); one optimisation step of a relaxed trigger is 1. Every baseline counts its
evaluations with a :class:`Budget`, stops before it would exceed the configured cap, and
reports the running count as ``evaluations`` in its trajectory entries, the last of which
(``event: "final"``) holds the total, the final hard-token measurement included.

Here are the pieces they share: :class:`OneByOne`, the inverter that runs its tasks one after
another (with progress reporting), the victims as a batch, hard-token losses of many
candidate triggers at once, and the final :class:`~trojscan.inversion.base.Inversion`
record.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch

from trojscan.inversion.base import (
    EpochCallback,
    Inversion,
    InversionTask,
    Inverter,
    Preselection,
    task_generator,
)
from trojscan.subjects.base import Batch, Candidate, Subject

#: Evaluations every baseline keeps back for the final hard-token measurement.
FINAL_EVALUATIONS = 1


class Budget:
    """Evaluations spent on one task, against an optional cap."""

    def __init__(self, cap: int | None) -> None:
        self.cap = cap
        self.used = 0

    def affords(self, n: int, keep: int = 0) -> bool:
        """Whether ``n`` more evaluations fit under the cap with ``keep`` still left."""
        return self.cap is None or self.used + n + keep <= self.cap

    def spend(self, n: int) -> None:
        """Count ``n`` evaluations; exceeding the cap is a bug in the caller."""
        if not self.affords(n):
            raise RuntimeError(f"evaluation budget exceeded: {self.used} + {n} > {self.cap}")
        self.used += n


def check_budget(max_evaluations: int | None, least: int) -> None:
    """Reject a cap under ``least`` (what the method needs to report anything at all)."""
    if max_evaluations is not None and max_evaluations < least:
        raise ValueError(f"max_evaluations must be None or >= {least}, got {max_evaluations}")


def initial_trigger(subject: Subject, token: str, length: int) -> torch.Tensor:
    """``length`` slots of ``token`` ((length,) ids on the subject's device), the start of a
    hard-token search; a token the vocabulary lacks is a ValueError naming
    ``initial_token``."""
    try:
        first = subject.token_id(token)
    except ValueError as exc:
        raise ValueError(f"initial_token: {exc}") from exc
    return torch.full((length,), first, dtype=torch.long, device=subject.device)


def victim_batch(subject: Subject, task: InversionTask, n_slots: int) -> Batch:
    """The task's victims with ``n_slots`` trigger slots at its position, on the device."""
    return subject.batch([task.candidate], [task.examples], n_slots)


@torch.no_grad()
def score_triggers(subject: Subject, batch: Batch, triggers: torch.Tensor, budget: Budget,
                   chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard-token loss (the subject's goal loss, mean over the rows) and attack success rate
    of each of the (K, m) ``triggers`` on all rows of ``batch``: two (K,) tensors. Costs K
    evaluations; forward passes hold at most ``chunk_rows`` rows (at least one trigger's)."""
    losses, hits = score_rows(subject, batch, triggers, budget, chunk_rows)
    return losses.mean(1), hits.mean(1)


@torch.no_grad()
def score_rows(subject: Subject, batch: Batch, triggers: torch.Tensor, budget: Budget,
               chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`score_triggers` row by row: two (K, rows) tensors, the hard-token loss and
    whether the trigger flipped the row."""
    budget.spend(len(triggers))
    n = len(batch)
    per_pass = max(1, chunk_rows // n)
    losses, hits = [], []
    for part in triggers.split(per_pass):
        rows = torch.arange(n, device=batch.owner.device).repeat(len(part))
        loss, hit = subject.hard_check(batch.subset(rows), part.repeat_interleave(n, 0))
        losses.append(loss.view(len(part), n))
        hits.append(hit.view(len(part), n).to(loss.dtype))
    return torch.cat(losses), torch.cat(hits)


@torch.no_grad()
def best_position(subject: Subject, task: InversionTask, trigger_ids: Sequence[int],
                  budget: Budget, chunk_rows: int) -> tuple[float, float, Candidate]:
    """The hard-token trigger ``trigger_ids`` on all the task's victims at each position its
    candidate stands for (:meth:`Subject.concrete`: one, or every position of a
    :data:`~trojscan.subjects.base.SPREAD` candidate): (loss, ASR, candidate) where the loss
    is lowest. One evaluation per position."""
    trigger = torch.tensor([list(trigger_ids)], dtype=torch.long, device=subject.device)
    measured = []
    for concrete in subject.concrete(task.candidate):
        batch = subject.batch([concrete], [task.examples], trigger.shape[1])
        loss, asr = score_triggers(subject, batch, trigger, budget, chunk_rows)
        measured.append((loss.item(), asr.item(), concrete))
    return min(measured, key=lambda m: m[0])


def rollback_noise(like: torch.Tensor, kind: str, scale: float,
                   generator: torch.Generator) -> torch.Tensor:
    """The noise a DBS rollback adds to the relaxed weights ``like``: U(0, ``scale``)
    (``kind`` ``uniform``, the authors' code) or N(0, ``scale``) (``gaussian``, Algorithm 1),
    drawn from ``generator`` on the CPU so that a seed gives the same stream on any device."""
    if kind == "uniform":
        sample = torch.rand(like.shape, generator=generator) * scale
    else:
        sample = torch.randn(like.shape, generator=generator) * scale
    return sample.to(like.device)


def flip_candidates(subject: Subject, batch: Batch, trigger: torch.Tensor, allowed: torch.Tensor,
                    top_k: int) -> tuple[torch.Tensor, float]:
    """HotFlip's first-order step (Ebrahimi et al. 2018; the token gradient of UAT and GCG):
    the gradient ``g_i`` of the mean goal loss over ``batch`` w.r.t. each slot embedding of
    ``trigger`` ((m,) ids) estimates the loss change of putting token ``v`` in slot ``i`` as
    ``(e_v - e_i) . g_i``; each slot's ``top_k`` candidates are the allowed tokens with the
    lowest ``e_v . g_i``, its current token excluded. Returns ((m, top_k) ids, the loss of
    ``trigger``); one evaluation (a forward and backward pass)."""
    embeddings = subject.embedding_matrix.detach()
    embeds = embeddings[trigger].clone().requires_grad_(True)
    loss = subject.goal_loss(batch, embeds).mean()
    (grad,) = torch.autograd.grad(loss, embeds)
    return flip_scores(grad, embeddings, trigger, allowed).topk(top_k, dim=1).indices, \
        loss.item()


def flip_scores(grad: torch.Tensor, embeddings: torch.Tensor, trigger: torch.Tensor,
                allowed: torch.Tensor) -> torch.Tensor:
    """HotFlip's (m, vocab) scores from the (m, d) gradient ``grad`` of a loss w.r.t. the
    slot embeddings of ``trigger``: ``-e_v . g_i`` (higher: a larger estimated loss drop),
    -inf for tokens not ``allowed`` and for each slot's current token."""
    scores = -(grad @ embeddings.T)
    scores[:, ~allowed] = -torch.inf
    scores.scatter_(1, trigger.view(-1, 1), -torch.inf)
    return scores


class Progress:
    """Reports tasks run one after another to ``on_epoch`` as if they were one batched run of
    ``epochs`` epochs (what the scan's progress display expects): ``on_epoch(e)`` once for each
    ``e`` in 0..epochs-1, in order, as the tasks get through their shares."""

    def __init__(self, on_epoch: Callable[[int], None] | None, tasks: int, epochs: int) -> None:
        self.on_epoch, self.tasks, self.epochs = on_epoch, tasks, epochs
        self.reported = 0

    def __call__(self, task: int, epoch: int) -> None:
        """Task ``task`` (0-based) has finished its epoch ``epoch``."""
        due = (task * self.epochs + epoch + 1) // self.tasks
        while self.on_epoch is not None and self.reported < due:
            self.on_epoch(self.reported)
            self.reported += 1

    def task_done(self, task: int) -> None:
        """Task ``task`` stopped (early or not): its remaining share counts as done."""
        self(task, self.epochs - 1)


class OneByOne(Inverter):
    """An inverter that runs its tasks one after another, each with its full budget, and
    reports them to ``on_epoch`` as one run of ``config.epochs`` epochs (see
    :class:`Progress`). Each task draws from a random stream of its own
    (:func:`~trojscan.inversion.base.task_generator`, from the config's ``seed``, 0 for a
    method without one), so its result does not depend on the other tasks. Subclasses
    implement :meth:`invert_one`."""

    def invert(self, subject: Subject, tasks: Sequence[InversionTask],
               on_epoch: EpochCallback | None = None,
               preselect: Preselection | None = None) -> list[Inversion]:
        """One :class:`Inversion` per task, in order; ``preselect`` is refused (a task run
        alone has no batch mates to be ranked against)."""
        if preselect is not None:
            raise ValueError(f"{self.name} inverts tasks one by one and cannot pre-select")
        progress = Progress(on_epoch, len(tasks), self.config.epochs)
        seed = getattr(self.config, "seed", 0)
        out = []
        for i, task in enumerate(tasks):
            out.append(self.invert_one(subject, task, task_generator(seed, task.candidate),
                                       lambda epoch, i=i: progress(i, epoch)))
            progress.task_done(i)
        return out

    @abstractmethod
    def invert_one(self, subject: Subject, task: InversionTask, generator: torch.Generator,
                   tick: Callable[[int], None]) -> Inversion:
        """Invert one task, drawing random numbers from ``generator``; ``tick(epoch)`` after
        each of its epochs."""


def finish(method: str, subject: Subject, task: InversionTask, batch: Batch,
           trigger: torch.Tensor, budget: Budget, started: float, epochs: int,
           trajectory: list[dict[str, Any]], chunk_rows: int,
           relaxed_loss: float | None = None, accepted: bool = True) -> Inversion:
    """Measure ``trigger`` ((m,) token ids) as hard tokens on the task's victims (one
    evaluation) and return the :class:`Inversion`. ``relaxed_loss`` None (a search over real
    tokens, with nothing relaxed) repeats the hard loss. The trajectory gets a last entry,
    ``event: "final"``, with the hard loss and the total evaluations."""
    loss, asr = score_triggers(subject, batch, trigger.reshape(1, -1), budget, chunk_rows)
    hard_loss = loss.item()
    trajectory.append({"epoch": epochs, "loss": hard_loss, "evaluations": budget.used,
                       "event": "final"})
    ids = trigger.tolist()
    tokens, text = subject.describe(ids)
    return Inversion(
        method=method, candidate=task.candidate, trigger_ids=ids, trigger_tokens=tokens,
        trigger_text=text,
        relaxed_loss=hard_loss if relaxed_loss is None else relaxed_loss, hard_loss=hard_loss,
        hard_asr=asr.item(), accepted=accepted, epochs=epochs,
        seconds=time.perf_counter() - started, trajectory=trajectory)
