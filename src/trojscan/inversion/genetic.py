"""Genetic search for a trigger (after Alzantot et al., EMNLP 2018), DBS's GA baseline
(Table 1).

Alzantot et al. evolve a population of perturbed sentences, each word substituted from a
small synonym list, with the model's output as the fitness. As DBS adapts it (Appendix A),
an individual is a trigger of ``m`` tokens drawn from the whole vocabulary (special tokens
excluded) and its fitness comes from the model's inversion loss with the trigger put in as
hard tokens (cross-entropy towards the target on the victims, Eq. 3 of DBS). Generation 0 is
``population`` random triggers. Each later generation keeps the best trigger (elitism) and
breeds the rest: two parents are drawn with probabilities ``softmax(-loss /
selection_temperature)`` (Alzantot's ``softmax(log p / temperature)`` with the loss in
place of ``-log p``), the child takes each slot from either parent with equal odds, and with
probability ``mutation_rate`` one random slot of the child becomes a random token (Alzantot's
one-word perturbation). The reported trigger is the best one of the last generation, which
by elitism is the best one seen. It is a real token sequence: ``relaxed_loss`` repeats
``hard_loss`` and ``accepted`` is True.

Defaults: population 300, mutation rate 0.5, 10 generations (DBS Appendix A); trigger length
10 (DBS Appendix A); selection temperature 0.3 (Alzantot et al.'s code).

Evaluations (see :mod:`trojscan.inversion.common`): ``population`` for generation 0,
``population - 1`` for each later one (the elite's loss is known), 1 for the final
measurement. Seeded: the same seed gives the same trigger.
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
    score_triggers,
    victim_batch,
)
from trojscan.subjects.base import Subject


@dataclass(frozen=True)
class GeneticConfig:
    """The genetic search's knobs.

    Attributes:
        trigger_length: m, tokens in a trigger (DBS Appendix A: 10).
        epochs: generations, the random first one included (DBS Appendix A: 10).
        population: triggers per generation (DBS Appendix A: 300).
        mutation_rate: probability that a child gets one random slot replaced by a random
            token (DBS Appendix A: 0.5).
        selection_temperature: parents are drawn with probabilities
            softmax(-loss / selection_temperature) (Alzantot et al.'s code: 0.3).
        max_evaluations: cap on evaluations per task (see the module docstring); None leaves
            ``epochs`` and ``population`` to bound them. A generation that would not fit is
            not bred; it must fit generation 0 and the final measurement.
        chunk_rows: at most this many rows per forward pass when scoring a generation.
        seed: seeds the population, the selection and the mutations.
    """

    trigger_length: int = 10
    epochs: int = 10
    population: int = 300
    mutation_rate: float = 0.5
    selection_temperature: float = 0.3
    max_evaluations: int | None = None
    chunk_rows: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.trigger_length, self.epochs, self.chunk_rows) < 1:
            raise ValueError("trigger_length, epochs and chunk_rows must be >= 1")
        if self.population < 2:
            raise ValueError("population must be >= 2 (the elite and at least one child)")
        if not 0 <= self.mutation_rate <= 1:
            raise ValueError(f"mutation_rate must be in [0, 1], got {self.mutation_rate}")
        if self.selection_temperature <= 0:
            raise ValueError("selection_temperature must be > 0")
        check_budget(self.max_evaluations, self.population + FINAL_EVALUATIONS)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _breed(population: torch.Tensor, losses: torch.Tensor, config: GeneticConfig,
           vocabulary: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``population - 1`` children of ``population`` ((P, m) ids) with ``losses`` (P,)."""
    n, m = config.population - 1, config.trigger_length
    weights = torch.softmax(-losses.cpu() / config.selection_temperature, dim=0)
    first = torch.multinomial(weights, n, replacement=True, generator=generator)
    second = torch.multinomial(weights, n, replacement=True, generator=generator)
    pick = torch.rand(n, m, generator=generator) < 0.5
    children = torch.where(pick, population.cpu()[first], population.cpu()[second])
    mutated = (torch.rand(n, generator=generator) < config.mutation_rate).nonzero().squeeze(-1)
    slots = torch.randint(m, (len(mutated),), generator=generator)
    tokens = vocabulary[torch.randint(len(vocabulary), (len(mutated),), generator=generator)]
    children[mutated, slots] = tokens
    return children.to(population.device)


@register("genetic")
class Genetic(OneByOne):
    """A genetic search over token triggers, one task after another."""

    config_class = GeneticConfig

    def invert_one(self, subject: Subject, task: InversionTask, generator: torch.Generator,
                   tick: Callable[[int], None]) -> Inversion:
        """The genetic search on one task; ``generator`` draws populations, parents and
        mutations."""
        config = self.config
        started = time.perf_counter()
        budget = Budget(config.max_evaluations)
        vocabulary = subject.allowed_tokens().nonzero().squeeze(-1).cpu()
        batch = victim_batch(subject, task, config.trigger_length)
        draw = torch.randint(len(vocabulary), (config.population, config.trigger_length),
                             generator=generator)
        population = vocabulary[draw].to(subject.device)
        losses, _ = score_triggers(subject, batch, population, budget, config.chunk_rows)
        trajectory: list[dict[str, Any]] = []
        for generation in range(config.epochs):
            if generation:
                if not budget.affords(config.population - 1, keep=FINAL_EVALUATIONS):
                    break
                elite = int(losses.argmin())
                children = _breed(population, losses, config, vocabulary, generator)
                child_losses, _ = score_triggers(subject, batch, children, budget,
                                                 config.chunk_rows)
                population = torch.cat([population[elite : elite + 1], children])
                losses = torch.cat([losses[elite : elite + 1], child_losses])
            trajectory.append({"epoch": generation, "loss": losses.min().item(),
                               "mean_loss": losses.mean().item(), "evaluations": budget.used})
            tick(generation)
        best = population[int(losses.argmin())]
        return finish(self.name, subject, task, batch, best, budget, started, len(trajectory),
                      trajectory, config.chunk_rows)
