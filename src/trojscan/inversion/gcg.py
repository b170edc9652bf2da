"""GCG: greedy coordinate gradient search over real tokens (Zou et al., "Universal and
Transferable Adversarial Attacks on Aligned Language Models", 2023, Algorithm 1), a hard-token
search stronger than UAT's single flip per slot.

The trigger is ``m`` real tokens, initialised to ``initial_token``. Each iteration takes the
token gradient of the goal loss (HotFlip's first-order estimate, as UAT:
:func:`~trojscan.inversion.common.flip_candidates`) and keeps the ``top_k`` most promising
tokens of every slot; it then draws ``candidates`` triggers, each the current one with one
uniformly drawn slot set to one of that slot's top-k tokens, evaluates them all exactly as
hard tokens, and moves to the best of them ("x := x-tilde(b*)", Algorithm 1), even when it is
worse than the current trigger, which lets the search leave a local minimum. The best trigger
seen is reported. Every point of the search is a real token sequence: ``relaxed_loss``
repeats ``hard_loss`` and ``accepted`` is True.

Defaults: the paper's top-k 256 and batch 512 are for prompts of LLMs with 20 slots; here 64
and 128 (a tenth of the evaluations per iteration, on triggers of 1 to 10 slots). Beyond the
paper: the search stops after ``patience`` iterations without a better trigger, and duplicate
candidates are evaluated once.

Evaluations (see :mod:`trojscan.inversion.common`): per iteration 1 (the gradient pass) plus at
most ``candidates``; 1 for the final measurement.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from trojscan.inversion.base import Inversion, InversionTask, register
from trojscan.inversion.common import (
    FINAL_EVALUATIONS,
    Budget,
    OneByOne,
    check_budget,
    finish,
    flip_candidates,
    initial_trigger,
    score_triggers,
    victim_batch,
)
from trojscan.subjects.base import Batch, Subject


@dataclass(frozen=True)
class GCGConfig:
    """GCG's knobs.

    Attributes:
        trigger_length: m, tokens in the trigger.
        epochs: iterations T, each one gradient pass and one batch of candidates.
        top_k: k, tokens kept per slot from the token gradient (paper: 256).
        candidates: B, triggers drawn and evaluated per iteration (paper: 512).
        patience: the search stops after this many iterations without a better trigger
            (beyond the paper); 0 runs every iteration.
        initial_token: the token every slot starts as; it must be one token of the subject's
            vocabulary.
        max_evaluations: cap on evaluations per task (see the module docstring); None leaves
            ``epochs`` to bound them. An iteration that would not fit is not started.
        chunk_rows: at most this many rows per forward pass when scoring candidates.
        seed: seeds the drawing of candidates (each task from a stream of its own).
    """

    trigger_length: int = 10
    epochs: int = 30
    top_k: int = 64
    candidates: int = 128
    patience: int = 5
    initial_token: str = "the"
    max_evaluations: int | None = None
    chunk_rows: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.trigger_length, self.epochs, self.top_k, self.candidates,
               self.chunk_rows) < 1:
            raise ValueError("trigger_length, epochs, top_k, candidates and chunk_rows must be "
                             ">= 1")
        if self.patience < 0:
            raise ValueError("patience must be >= 0 (0 = never stop early)")
        if not self.initial_token:
            raise ValueError("initial_token must be a token")
        check_budget(self.max_evaluations, FINAL_EVALUATIONS)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def search(subject: Subject, batch: Batch, start: torch.Tensor, config: GCGConfig,
           generator: torch.Generator, budget: Budget, tick: Callable[[int], None],
           ) -> tuple[torch.Tensor, float, list[dict[str, Any]]]:
    """Algorithm 1 from the (m,) ids ``start`` on the rows of ``batch``: (the best trigger
    seen, its loss, the trajectory)."""
    allowed = subject.allowed_tokens()
    per_iteration = 1 + config.candidates
    trigger, best, best_loss = start, start, float("inf")
    stale = 0
    trajectory: list[dict[str, Any]] = []
    for epoch in range(config.epochs):
        if not budget.affords(per_iteration, keep=FINAL_EVALUATIONS):
            break
        top, loss = flip_candidates(subject, batch, trigger, allowed, config.top_k)
        budget.spend(1)
        if loss < best_loss:
            best, best_loss = trigger, loss
        slots = torch.randint(len(trigger), (config.candidates,), generator=generator)
        picks = torch.randint(top.shape[1], (config.candidates,), generator=generator)
        slots, picks = slots.to(trigger.device), picks.to(trigger.device)
        tried = trigger.repeat(config.candidates, 1)
        tried[torch.arange(config.candidates, device=trigger.device), slots] = top[slots, picks]
        tried = torch.unique(tried, dim=0)
        losses, _ = score_triggers(subject, batch, tried, budget, config.chunk_rows)
        chosen = int(losses.argmin())
        trigger = tried[chosen]
        step: dict[str, Any] = {"epoch": epoch, "loss": losses[chosen].item(),
                                "evaluations": budget.used}
        if losses[chosen].item() < best_loss:
            best, best_loss, stale = trigger, losses[chosen].item(), 0
        else:
            stale += 1
        tick(epoch)
        if config.patience and stale >= config.patience:
            step["event"] = "stop"
            trajectory.append(step)
            break
        trajectory.append(step)
    return best, best_loss, trajectory


@register("gcg")
class GCG(OneByOne):
    """Greedy coordinate gradient search, one task after another."""

    config_class = GCGConfig

    def invert_one(self, subject: Subject, task: InversionTask, generator: torch.Generator,
                   tick: Callable[[int], None]) -> Inversion:
        """GCG on one task; ``generator`` draws the candidates."""
        config = self.config
        started = time.perf_counter()
        budget = Budget(config.max_evaluations)
        batch = victim_batch(subject, task, config.trigger_length)
        start = initial_trigger(subject, config.initial_token, config.trigger_length)
        best, _, trajectory = search(subject, batch, start, config, generator, budget, tick)
        return finish(self.name, subject, task, batch, best, budget, started, len(trajectory),
                      trajectory, config.chunk_rows)
