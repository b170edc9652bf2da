"""DBS: trigger inversion with Dynamic Bound Scaling (Shen et al., ICML 2022).

Read this beside Algorithm 1 of shared/papers/dbs-icml2022.txt.

The trigger is ``m`` slots, each a point in the convex hull of all token embeddings
(Proposition I): ``alpha_i = softmax(w_i / lambda)`` over the vocabulary (special tokens
excluded) and slot embedding ``alpha_i @ E`` (Eqs. 8-10). The inversion loss is the
cross-entropy towards the candidate target on the victim examples with the trigger
spliced in (Eq. 3). Every ``s`` epochs (Algorithm 1, lines 3-9) the temperature ``lambda``
is divided by ``c`` while the loss is under the bound ``beta'`` (temperature focusing);
otherwise it is multiplied by ``d`` up to ``u`` and ``w`` gets random noise (backtracking
with randomisation). A trigger that is nearly one-hot and under the bound is accepted
(line 11). Beyond the paper, the accepted trigger is re-evaluated as hard tokens.

The inversion loss and the hard-token check are the subject's (for a classifier,
cross-entropy towards the candidate's target, Eq. 3); DBS only searches.

:class:`DBS` runs several inversions (a model's candidates) as one batched optimisation:
each candidate has its own trigger, temperature, bound and acceptance state, exactly as if
run alone, but all their victim rows share one forward and backward pass. Rows are grouped
into length buckets so that short examples are not padded to the longest. The ablations of
the paper's Table 4 are named configurations of DBS: ``dbs-fixed-temperature`` ("w/o Temp
Scaling") and ``dbs-no-backtracking`` ("w/o Backtracking").
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from trojscan.inversion.base import (
    EpochCallback,
    Inversion,
    InversionTask,
    Inverter,
    Preselection,
    register,
    register_variant,
    task_generator,
)
from trojscan.inversion.common import rollback_noise
from trojscan.subjects.base import Batch, Subject

NOISE_KINDS = ("uniform", "gaussian")


@dataclass(frozen=True)
class DBSConfig:
    """Every knob of Algorithm 1 and of the authors' TrojAI code.

    Attributes:
        trigger_length: m, slots in the inverted trigger ("We set the length of trigger to
            10", Appendix A).
        epochs: optimisation epochs, one full pass over the victim examples each ("We set
            the number of optimization epochs to 200", Appendix A).
        learning_rate: Adam's initial rate ("the Adam optimizer with the initial learning
            rate 0.5", Appendix A).
        lr_decay: factor applied to the rate every ``lr_decay_every`` epochs (authors' code:
            x0.5 every 50 epochs); 1 disables it.
        lr_decay_every: epochs between rate decays.
        initial_temperature: lambda at the start (authors' code: 2).
        max_temperature: u, the cap on backtracking ("We set the temperature upper bound
            u = 2").
        check_every: s, epochs between temperature checks (authors' code: 5).
        focus_factor: c, lambda is divided by it when the loss is under the bound ("we use
            d = 5 and c = 2").
        rollback_factor: d, lambda is multiplied by it on backtracking. The paper says 5,
            the authors' code uses 2; the default follows the code, whose numbers the paper
            reports.
        loss_bound: beta', the bound under which the temperature may drop (authors' code
            ``loss_barrier`` 0.1).
        noise: ``uniform`` (authors' code: U(0, noise_scale) added to w) or ``gaussian``
            (Algorithm 1, line 8: N(0, noise_scale)).
        noise_scale: delta, the size of the randomisation ("delta = 10").
        rollback_limit: after this many rollbacks the bound is relaxed to
            min(2 * bound, best_loss - 1e-3) (authors' code: 5).
        one_hot_tolerance: epsilon; a trigger counts as one-hot when
            sum_i (1 - max_j alpha_ij) < epsilon (authors' code: 0.001).
        temperature_scaling: ablation switch (Table 4, "w/o Temp Scaling"): False keeps
            lambda = 1, never checks, and accepts any trigger under the bound, one-hot or not.
        backtracking: ablation switch (Table 4, "w/o Backtracking"): False never rolls back;
            once focusing has started lambda is divided by c at every check.
        seed: seeds the randomisation; each task draws from a stream of its own (seeded by
            this and its candidate), so its result does not depend on its batch mates.
        buckets: rows of a (batched) inversion are sorted by length and split into this many
            forward passes, each padded only to its own longest row; 1 pads all rows to the
            longest (the authors' code). Same result, less padding.
        patience: beyond the paper, a task stops once it has an accepted trigger and this
            many epochs pass without a better one (its rows leave the batch); 0 runs every
            task for all ``epochs`` (the authors' code).
    """

    trigger_length: int = 10
    epochs: int = 200
    learning_rate: float = 0.5
    lr_decay: float = 0.5
    lr_decay_every: int = 50
    initial_temperature: float = 2.0
    max_temperature: float = 2.0
    check_every: int = 5
    focus_factor: float = 2.0
    rollback_factor: float = 2.0
    loss_bound: float = 0.1
    noise: str = "uniform"
    noise_scale: float = 10.0
    rollback_limit: int = 5
    one_hot_tolerance: float = 1e-3
    temperature_scaling: bool = True
    backtracking: bool = True
    seed: int = 0
    buckets: int = 3
    patience: int = 20

    def __post_init__(self) -> None:
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {self.noise!r}")
        if min(self.trigger_length, self.epochs, self.check_every, self.buckets) < 1:
            raise ValueError("trigger_length, epochs, check_every and buckets must be >= 1")
        if self.patience < 0:
            raise ValueError("patience must be >= 0 (0 = never stop early)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class _Arm:
    """The state of Algorithm 1 for one task."""

    temperature: float
    bound: float
    generator: torch.Generator  # the randomisation of this task alone
    focusing: bool = False
    rollbacks: int = 0
    best: tuple[float, torch.Tensor] | None = None  # (relaxed loss, slot argmax ids)
    accepted_at: int = -1  # epoch of the last acceptance
    stopped: bool = False
    last: torch.Tensor | None = None  # slot argmax ids of the latest epoch run
    trajectory: list[dict[str, Any]] = field(default_factory=list)

    @property
    def loss(self) -> float:
        """Loss so far: the accepted trigger's, else the latest epoch's."""
        return self.best[0] if self.best else self.trajectory[-1]["loss"]


def _buckets(batch: Batch, rows: torch.Tensor, n: int) -> list[Batch]:
    """``rows`` sorted by length and cut into ``n`` sub-batches."""
    order = rows[batch.lengths[rows].argsort()]
    return [batch.subset(part) for part in order.tensor_split(min(n, len(order)))]


def _step(arm: _Arm, epoch: int, value: float, alpha: torch.Tensor, w: torch.Tensor,
          config: DBSConfig) -> None:
    """Lines 3-11 of Algorithm 1 for one task after an optimisation step at ``epoch``."""
    step: dict[str, Any] = {"epoch": epoch, "loss": value, "temperature": arm.temperature}
    arm.last = alpha.argmax(-1)

    # Line 11: accept a (nearly) one-hot trigger under the bound; the bound then drops to
    # half its loss (authors' code). Beyond the paper, a one-hot trigger that merely improves
    # on the accepted one is kept too, so the reported loss is the lowest seen.
    one_hot = (1 - alpha.max(-1).values).sum().item() < config.one_hot_tolerance
    if (one_hot or not config.temperature_scaling) and (
            value < arm.bound or (arm.best is not None and value < arm.best[0])):
        if value < arm.bound:
            arm.bound = value / 2
        arm.best = (value, alpha.argmax(-1))
        arm.accepted_at = epoch
        step["event"] = "accept"

    # Lines 3-9: every s epochs, focus (loss under the bound) or backtrack.
    if config.temperature_scaling and (epoch + 1) % config.check_every == 0:
        if value < arm.bound or (arm.focusing and not config.backtracking):
            arm.focusing = True
            arm.temperature /= config.focus_factor
            step.setdefault("event", "focus")
        elif arm.focusing:
            arm.temperature = min(arm.temperature * config.rollback_factor,
                                  config.max_temperature)
            with torch.no_grad():
                w.add_(rollback_noise(w, config.noise, config.noise_scale, arm.generator))
            arm.rollbacks += 1
            step.setdefault("event", "rollback")
            if arm.rollbacks >= config.rollback_limit:
                best_loss = arm.best[0] if arm.best else math.inf
                arm.bound = min(2 * arm.bound, best_loss - 1e-3)
                arm.rollbacks = 0

    # Beyond the paper: a task whose accepted trigger has not improved for ``patience``
    # epochs has settled; it stops.
    if config.patience and arm.best is not None and epoch - arm.accepted_at >= config.patience:
        arm.stopped = True
        step["event"] = "stop"
    arm.trajectory.append(step)


def _drop_all_but(arms: list[_Arm], keep: int) -> None:
    """K-Arm preselection inside the run: the ``keep`` tasks with the lowest loss so far go
    on, every other running task stops."""
    ranked = sorted(range(len(arms)), key=lambda i: arms[i].loss)
    for i in ranked[keep:]:
        if not arms[i].stopped:
            arms[i].stopped = True
            arms[i].trajectory[-1]["event"] = "drop"


@register("dbs")
class DBS(Inverter):
    """Algorithm 1 for every task at once, the tasks' rows sharing each forward pass."""

    config_class = DBSConfig
    batched = True

    def invert(self, subject: Subject, tasks: Sequence[InversionTask],
               on_epoch: EpochCallback | None = None,
               preselect: Preselection | None = None) -> list[Inversion]:
        """One :class:`Inversion` per task, in order.

        With ``preselect``, after ``preselect.after`` epochs only the ``preselect.keep`` tasks
        with the lowest loss so far go on (K-Arm preselection that continues the pre-run
        instead of restarting it); the others end with a ``drop`` event."""
        config = self.config
        if not tasks:
            return []
        started = time.perf_counter()
        embeddings = subject.embedding_matrix.detach()
        excluded = torch.where(subject.allowed_tokens(), 0.0, -math.inf)

        # All tasks' victim rows in one batch; batch.owner[r] is the task row r belongs to.
        batch = subject.batch([t.candidate for t in tasks], [t.examples for t in tasks],
                              config.trigger_length)
        row_task = batch.owner
        sizes = torch.tensor([len(task.examples) for task in tasks])
        weight = 1 / sizes.to(subject.device, torch.float)  # each task's loss is a mean

        w = torch.zeros(len(tasks), config.trigger_length, embeddings.shape[0],
                        device=embeddings.device, requires_grad=True)
        optimiser = torch.optim.Adam([w], lr=config.learning_rate)
        schedule = torch.optim.lr_scheduler.StepLR(optimiser, config.lr_decay_every,
                                                   config.lr_decay)
        initial = config.initial_temperature if config.temperature_scaling else 1.0
        arms = [_Arm(temperature=initial, bound=config.loss_bound,
                     generator=task_generator(config.seed, task.candidate)) for task in tasks]

        running: list[int] = []
        buckets: list[Batch] = []
        for epoch in range(config.epochs):
            active = [i for i, arm in enumerate(arms) if not arm.stopped]
            if not active:
                break
            if active != running:  # the rows of stopped tasks leave the batch
                running = active
                rows = torch.isin(row_task, torch.tensor(active, device=row_task.device))
                buckets = _buckets(batch, rows.nonzero().squeeze(-1), config.buckets)
            # Line 2: optimise Eq. 9 at each task's current temperature.
            temperature = torch.tensor([arm.temperature for arm in arms], device=w.device)
            alpha = torch.softmax((w + excluded) / temperature.view(-1, 1, 1), dim=-1)
            triggers = alpha @ embeddings  # (tasks, m, d)
            losses = torch.zeros(len(tasks), device=w.device)
            for sub in buckets:
                # Rows pick their task's trigger, and tasks sum their rows' losses, by
                # one-hot products: an indexed gather would accumulate its gradient in an
                # order that varies between runs on a multi-threaded CPU.
                owned = F.one_hot(sub.owner, len(tasks)).to(triggers.dtype)
                rows = (owned @ triggers.flatten(1)).view(len(sub), *triggers.shape[1:])
                loss = subject.goal_loss(sub, rows)
                losses = losses + owned.T @ (loss * weight[sub.owner])
            optimiser.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimiser.step()
            schedule.step()
            alpha = alpha.detach()
            values = losses.tolist()
            for i in active:
                _step(arms[i], epoch, values[i], alpha[i], w[i], config)
            if preselect and epoch + 1 == preselect.after:
                _drop_all_but(arms, preselect.keep)
            if on_epoch:
                on_epoch(epoch)

        # Beyond the paper: every reported trigger is re-run as hard tokens.
        final = [arm.best[1] if arm.best else arm.last for arm in arms]
        with torch.no_grad():
            hard_loss, hit = subject.hard_check(batch, torch.stack(final)[row_task])
        seconds = time.perf_counter() - started
        out = []
        for i, (task, arm) in enumerate(zip(tasks, arms, strict=True)):
            ids = final[i].tolist()
            mine = row_task == i
            tokens, text = subject.describe(ids)
            out.append(Inversion(
                method=self.name, candidate=task.candidate, trigger_ids=ids,
                trigger_tokens=tokens, trigger_text=text, relaxed_loss=arm.loss,
                hard_loss=hard_loss[mine].mean().item(), hard_asr=hit[mine].mean().item(),
                accepted=arm.best is not None, epochs=len(arm.trajectory), seconds=seconds,
                trajectory=arm.trajectory))
        return out


register_variant("dbs-fixed-temperature", "dbs", temperature_scaling=False)
register_variant("dbs-no-backtracking", "dbs", backtracking=False)
