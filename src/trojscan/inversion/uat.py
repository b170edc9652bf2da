"""UAT: universal adversarial triggers by HotFlip token search (Wallace et al., EMNLP 2019),
the UAT baseline of DBS (Table 1).

The trigger is ``m`` real tokens, initialised to ``initial_token`` ("the the the", as in the
authors' code). Each iteration takes the gradient of the inversion loss (cross-entropy towards
the target, Eq. 3 of DBS) with respect to the trigger's slot embeddings, averaged over the
victims; the first-order (HotFlip) estimate of the loss change from putting token ``v`` into
slot ``i`` is ``(e_v - e_i) . g_i``, so each slot's ``top_k`` candidates are the tokens
with the lowest ``e_v . g_i`` over the whole vocabulary, special tokens excluded. A left-to-
right beam search over the slots (authors' ``get_best_candidates``) then evaluates the
candidates as hard tokens and keeps the ``beam_width`` best triggers; the best becomes the
next trigger. Every point of the search is a real token sequence, so there is no relaxation:
the reported ``relaxed_loss`` repeats ``hard_loss`` and ``accepted`` is True.

Defaults: ``top_k`` 1 ("we set k=1 in the top-k token search", DBS Appendix A); trigger length
10 and 200 iterations (DBS Appendix A: all optimisation baselines share DBS's settings);
beam width 1 and all victims in every step (the authors' batch of 128 holds all 20 victims per
class that DBS scans with). Beyond the authors' code: a slot's current token is never its own
candidate, and the unchanged trigger's loss is not re-evaluated. With all victims in every
step the search is deterministic, so an iteration that changes nothing ends it (the next one
would repeat it exactly).

Evaluations (see :mod:`trojscan.inversion.common`): per iteration 1 (the gradient pass) plus
``trigger_length * top_k * beam_width`` at most (the candidates); 1 for the final measurement.
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
class UATConfig:
    """UAT's knobs.

    Attributes:
        trigger_length: m, tokens in the trigger (DBS Appendix A: 10).
        epochs: iterations, each one gradient step and one beam search (DBS Appendix A: 200).
        top_k: HotFlip candidates per slot ("k=1", DBS Appendix A).
        beam_width: triggers kept by the left-to-right beam search (authors' code: 1).
        initial_token: the token every slot starts as (authors' code: "the"); it must be one
            token of the subject's vocabulary.
        batch_size: victims per iteration, drawn afresh each time (seeded); 0 uses all of them
            every time, which makes the search deterministic.
        max_evaluations: cap on evaluations per task (see the module docstring); None leaves
            only ``epochs`` to bound them. An iteration that would not fit is not started.
        chunk_rows: at most this many rows per forward pass when scoring candidates.
        seed: seeds the victim draws of ``batch_size``.
    """

    trigger_length: int = 10
    epochs: int = 200
    top_k: int = 1
    beam_width: int = 1
    initial_token: str = "the"
    batch_size: int = 0
    max_evaluations: int | None = None
    chunk_rows: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.trigger_length, self.epochs, self.top_k, self.beam_width,
               self.chunk_rows) < 1:
            raise ValueError("trigger_length, epochs, top_k, beam_width and chunk_rows must be "
                             ">= 1")
        if self.batch_size < 0:
            raise ValueError("batch_size must be >= 0 (0 = all victims)")
        if not self.initial_token:
            raise ValueError("initial_token must be a token")
        check_budget(self.max_evaluations, FINAL_EVALUATIONS)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    def per_iteration(self) -> int:
        """Evaluations one iteration may take."""
        return 1 + self.trigger_length * self.top_k * self.beam_width


def _beam_search(subject: Subject, batch: Batch, trigger: torch.Tensor, loss: float,
                 candidates: torch.Tensor, budget: Budget,
                 config: UATConfig) -> tuple[torch.Tensor, float]:
    """Authors' ``get_best_candidates``: slot by slot, each kept trigger unchanged or with one
    of the slot's ``candidates`` ((m, k) ids) put in; the ``beam_width`` lowest losses go on."""
    beams = [(loss, trigger)]
    for slot in range(config.trigger_length):
        tried = []
        for _, ids in beams:
            for token in candidates[slot]:
                changed = ids.clone()
                changed[slot] = token
                tried.append(changed)
        losses, _ = score_triggers(subject, batch, torch.stack(tried), budget,
                                   config.chunk_rows)
        pool = beams + list(zip(losses.tolist(), tried, strict=True))
        beams = sorted(pool, key=lambda beam: beam[0])[: config.beam_width]
    return beams[0][1], beams[0][0]


@register("uat")
class UAT(OneByOne):
    """HotFlip token search, one task after another."""

    config_class = UATConfig

    def invert_one(self, subject: Subject, task: InversionTask, generator: torch.Generator,
                   tick: Callable[[int], None]) -> Inversion:
        """UAT on one task; ``generator`` draws the victims of ``batch_size``."""
        config = self.config
        started = time.perf_counter()
        budget = Budget(config.max_evaluations)
        allowed = subject.allowed_tokens()
        batch = victim_batch(subject, task, config.trigger_length)
        n = len(batch)
        trigger = initial_trigger(subject, config.initial_token, config.trigger_length)
        everyone = config.batch_size == 0 or config.batch_size >= n
        trajectory: list[dict[str, Any]] = []
        for epoch in range(config.epochs):
            if not budget.affords(config.per_iteration(), keep=FINAL_EVALUATIONS):
                break
            rows = batch if everyone else batch.subset(
                torch.randperm(n, generator=generator)[: config.batch_size].to(subject.device))
            candidates, loss = flip_candidates(subject, rows, trigger, allowed, config.top_k)
            budget.spend(1)
            new, new_loss = _beam_search(subject, rows, trigger, loss, candidates, budget,
                                         config)
            step: dict[str, Any] = {"epoch": epoch, "loss": new_loss,
                                    "evaluations": budget.used}
            tick(epoch)
            if everyone and torch.equal(new, trigger):
                step["event"] = "converged"
                trajectory.append(step)
                break
            trajectory.append(step)
            trigger = new
        return finish(self.name, subject, task, batch, trigger, budget, started,
                      len(trajectory), trajectory, config.chunk_rows)
