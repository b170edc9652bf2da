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
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trojscan.inversion.base import Inversion
from trojscan.subjects.text import TextSubject

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
        seed: seeds the randomisation.
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

    def __post_init__(self) -> None:
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {self.noise!r}")
        if self.trigger_length < 1 or self.epochs < 1 or self.check_every < 1:
            raise ValueError("trigger_length, epochs and check_every must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _noise(like: torch.Tensor, config: DBSConfig, generator: torch.Generator) -> torch.Tensor:
    if config.noise == "uniform":
        sample = torch.rand(like.shape, generator=generator) * config.noise_scale
    else:
        sample = torch.randn(like.shape, generator=generator) * config.noise_scale
    return sample.to(like.device)


def invert(
    subject: TextSubject,
    texts: Sequence[str],
    labels: Sequence[int],
    target: int,
    position: str = "start",
    config: DBSConfig | None = None,
) -> Inversion:
    """Invert a trigger that flips ``texts`` (the victims, with their true ``labels``) to
    ``target``, with the trigger slots at ``position``."""
    config = config or DBSConfig()
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    embeddings = subject.embedding_matrix.detach()
    excluded = torch.zeros(embeddings.shape[0], device=embeddings.device)
    excluded[subject.special_token_ids()] = -math.inf
    batch = subject.batch(texts, labels, config.trigger_length, position).to(subject.device)
    goal = torch.full_like(batch.labels, target)

    w = torch.zeros(config.trigger_length, embeddings.shape[0], device=embeddings.device,
                    requires_grad=True)
    optimiser = torch.optim.Adam([w], lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.StepLR(optimiser, config.lr_decay_every, config.lr_decay)

    temperature = config.initial_temperature if config.temperature_scaling else 1.0
    bound = config.loss_bound
    focusing, rollbacks = False, 0
    best: tuple[float, torch.Tensor] | None = None  # (relaxed loss, slot argmax ids)
    trajectory: list[dict[str, Any]] = []
    alpha = torch.softmax((w + excluded) / temperature, dim=-1)
    for epoch in range(config.epochs):
        # Line 2: optimise Eq. 9 at the current temperature.
        alpha = torch.softmax((w + excluded) / temperature, dim=-1)
        loss = F.cross_entropy(subject.logits_from_trigger(batch, alpha @ embeddings), goal)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        value = loss.item()
        step: dict[str, Any] = {"epoch": epoch, "loss": value, "temperature": temperature}

        # Line 11: accept a (nearly) one-hot trigger under the bound; the bound then drops
        # to half its loss (authors' code). Beyond the paper, a one-hot trigger that merely
        # improves on the accepted one is kept too, so the reported loss is the lowest seen.
        one_hot = (1 - alpha.detach().max(-1).values).sum().item() < config.one_hot_tolerance
        if (one_hot or not config.temperature_scaling) and (
                value < bound or (best is not None and value < best[0])):
            if value < bound:
                bound = value / 2
            best = (value, alpha.detach().argmax(-1))
            step["event"] = "accept"

        # Lines 3-9: every s epochs, focus (loss under the bound) or backtrack.
        if config.temperature_scaling and (epoch + 1) % config.check_every == 0:
            if value < bound or (focusing and not config.backtracking):
                focusing = True
                temperature /= config.focus_factor
                step.setdefault("event", "focus")
            elif focusing:
                temperature = min(temperature * config.rollback_factor, config.max_temperature)
                with torch.no_grad():
                    w.add_(_noise(w, config, generator))
                rollbacks += 1
                step.setdefault("event", "rollback")
                if rollbacks >= config.rollback_limit:
                    best_loss = best[0] if best else math.inf
                    bound = min(2 * bound, best_loss - 1e-3)
                    rollbacks = 0
        trajectory.append(step)

    accepted = best is not None
    relaxed, ids = best if best is not None else (trajectory[-1]["loss"],
                                                  alpha.detach().argmax(-1))
    with torch.no_grad():
        hard = subject.logits_from_tokens(batch, ids.tolist())
    tokens = subject.tokenizer.convert_ids_to_tokens(ids.tolist())
    return Inversion(
        method="dbs", target=target, victims=sorted(set(labels)), position=position,
        trigger_ids=ids.tolist(), trigger_tokens=tokens,
        trigger_text=subject.tokenizer.convert_tokens_to_string(tokens),
        relaxed_loss=relaxed, hard_loss=F.cross_entropy(hard, goal).item(),
        hard_asr=(hard.argmax(-1) == goal).float().mean().item(), accepted=accepted,
        epochs=config.epochs, seconds=time.perf_counter() - started, trajectory=trajectory)
