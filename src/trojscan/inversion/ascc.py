"""ASCC: adversarial sparse convex combination (Dong et al., ICLR 2021), adapted to trigger
inversion as DBS's ASCC baseline (Table 1).

ASCC models a word's substitutions as the convex hull of their embeddings and optimises the
combination weights ``alpha = softmax(w)`` with an entropy regulariser that pushes each
combination towards a single word. As DBS adapts it (Appendix A), the hull of every trigger
slot spans the whole vocabulary (special tokens excluded), exactly DBS's Eq. 9, but the
temperature stays 1 and the entropy term does the focusing instead of DBS's temperature
scaling and backtracking. The loss minimised is the inversion loss (cross-entropy towards the
target on the victims, Eq. 3 of DBS) plus ``sparsity_weight`` times the summed entropy of the
slots' weights (ASCC sums its regulariser over the positions of the text). The reported
trigger is each slot's argmax token after the last step.

Defaults: sparsity weight 10 ("as suggested in the paper", DBS Appendix A); trigger length 10,
200 epochs, Adam with initial rate 0.5 (DBS Appendix A: all optimisation baselines share
DBS's settings), halved every 50 epochs (DBS's authors' code, as :class:`DBSConfig`).

``relaxed_loss`` is the cross-entropy (without the regulariser) of the last relaxed trigger;
``accepted`` is DBS's one-hot test of it (sum over slots of 1 - max alpha under
``one_hot_tolerance``), so the scan ranks a trigger that became one-hot by its relaxed loss and
one that did not by its hard-token loss, as it does DBS's.

Evaluations (see :mod:`trojscan.inversion.common`): 1 per epoch, 1 for the final measurement.
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
    victim_batch,
)
from trojscan.subjects.base import Subject


@dataclass(frozen=True)
class ASCCConfig:
    """ASCC's knobs.

    Attributes:
        trigger_length: m, slots in the trigger (DBS Appendix A: 10).
        epochs: optimisation epochs, one pass over the victims each (DBS Appendix A: 200).
        learning_rate: Adam's initial rate (DBS Appendix A: 0.5).
        lr_decay: factor applied to the rate every ``lr_decay_every`` epochs (DBS's code:
            0.5); 1 disables it.
        lr_decay_every: epochs between rate decays (DBS's code: 50).
        sparsity_weight: coefficient of the entropy regulariser (DBS Appendix A: 10).
        one_hot_tolerance: the final trigger is ``accepted`` when the sum over slots of
            (1 - max alpha) is under it (DBS's code: 0.001).
        max_evaluations: cap on evaluations per task (see the module docstring); None leaves
            only ``epochs`` to bound them.
        chunk_rows: at most this many rows per forward pass of the final measurement.
    """

    trigger_length: int = 10
    epochs: int = 200
    learning_rate: float = 0.5
    lr_decay: float = 0.5
    lr_decay_every: int = 50
    sparsity_weight: float = 10.0
    one_hot_tolerance: float = 1e-3
    max_evaluations: int | None = None
    chunk_rows: int = 4096

    def __post_init__(self) -> None:
        if min(self.trigger_length, self.epochs, self.lr_decay_every, self.chunk_rows) < 1:
            raise ValueError("trigger_length, epochs, lr_decay_every and chunk_rows must be >= 1")
        if self.learning_rate <= 0 or not 0 < self.lr_decay <= 1:
            raise ValueError("learning_rate must be > 0 and lr_decay in (0, 1]")
        if self.sparsity_weight < 0 or self.one_hot_tolerance <= 0:
            raise ValueError("sparsity_weight must be >= 0 and one_hot_tolerance > 0")
        check_budget(self.max_evaluations, FINAL_EVALUATIONS)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@register("ascc")
class ASCC(OneByOne):
    """Entropy-regularised convex combinations, one task after another."""

    config_class = ASCCConfig

    def invert_one(self, subject: Subject, task: InversionTask, generator: torch.Generator,
                   tick: Callable[[int], None]) -> Inversion:
        """ASCC on one task (deterministic: ``generator`` is not drawn from)."""
        config = self.config
        started = time.perf_counter()
        budget = Budget(config.max_evaluations)
        embeddings = subject.embedding_matrix.detach()
        allowed = subject.allowed_tokens()
        excluded = torch.where(allowed, 0.0, -torch.inf)
        batch = victim_batch(subject, task, config.trigger_length)
        w = torch.zeros(config.trigger_length, len(allowed), device=subject.device,
                        requires_grad=True)
        optimiser = torch.optim.Adam([w], lr=config.learning_rate)
        schedule = torch.optim.lr_scheduler.StepLR(optimiser, config.lr_decay_every,
                                                   config.lr_decay)
        trajectory: list[dict[str, Any]] = []
        alpha = torch.softmax(w + excluded, dim=-1)
        relaxed: float | None = None  # the loss of ``alpha``, once it has been evaluated
        for epoch in range(config.epochs):
            if not budget.affords(1, keep=FINAL_EVALUATIONS):
                break
            alpha = torch.softmax(w + excluded, dim=-1)
            loss = subject.goal_loss(batch, alpha @ embeddings).mean()
            budget.spend(1)
            relaxed = loss.item()
            entropy = -(alpha * torch.log(alpha.clamp_min(1e-30))).sum()
            optimiser.zero_grad(set_to_none=True)
            (loss + config.sparsity_weight * entropy).backward()
            optimiser.step()
            schedule.step()
            trajectory.append({"epoch": epoch, "loss": relaxed, "entropy": entropy.item(),
                               "evaluations": budget.used})
            tick(epoch)
        alpha = alpha.detach()
        one_hot = (1 - alpha.max(-1).values).sum().item() < config.one_hot_tolerance
        return finish(self.name, subject, task, batch, alpha.argmax(-1), budget, started,
                      len(trajectory), trajectory, config.chunk_rows,
                      relaxed_loss=relaxed, accepted=one_hot and relaxed is not None)
