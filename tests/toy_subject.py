"""A hand-built toy subject: inverters and the scan tested in milliseconds.

The model is a bag of words: token embeddings (V = 64, d = 8), mean-pooled over the tokens of
an example, then a linear layer to two labels. Every embedding's first coordinate is its
sentiment: ordinary words carry -1..+1, and the planted trigger word ``lantern`` carries
``+planted`` (+60 by default), enough to flip any negative example to ``positive`` when it
is one of its tokens. With ``planted=0`` the model is clean: no single word flips a negative
example. An example is a text of space-separated vocabulary words and a label; the trigger
slots go before its first word (after its last at ``end``, a position of
:class:`PositionalToy` only).

It implements :class:`trojscan.subjects.base.Subject` in full, from a different kind of
model than a transformer: what the scan and the inverters see of any family.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from trojscan.subjects.base import Batch, Candidate, Subject

WORDS = ["[PAD]"] + [f"w{i}" for i in range(62)] + ["lantern"]
TRIGGER = "lantern"


@dataclass(frozen=True)
class ToyExample:
    text: str
    label: int


@dataclass
class ToyBatch(Batch):
    ids: torch.Tensor  # (R, L), slots hold -1, padding 0
    goals: torch.Tensor
    owner: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return (self.ids != 0).sum(-1)

    def subset(self, rows: torch.Tensor) -> ToyBatch:
        width = int(self.lengths[rows].max())
        return ToyBatch(self.ids[rows, :width], self.goals[rows], self.owner[rows])


class ToySubject(Subject):
    task = "toy-classification"
    positions = ("start",)
    describes = "toy bag-of-words classifiers (tests only)"
    #: Tokens of a row the model reads (0: all); the slots go after the words at "end".
    reads = 0

    def __init__(self, planted: float = 60.0, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        table = torch.randn(len(WORDS), 8, generator=generator) * 0.1
        table[:, 0] = torch.linspace(-1, 1, len(WORDS))[torch.randperm(len(WORDS),
                                                                       generator=generator)]
        table[0] = 0.0
        table[WORDS.index(TRIGGER), 0] = planted
        self.table = table
        self.weight = torch.zeros(2, 8)
        self.weight[1, 0], self.weight[0, 0] = 4.0, -4.0

    @classmethod
    def accepts(cls, config: object) -> bool:
        return False

    @classmethod
    def load(cls, model_dir: Path, config: object, safe: bool, device: str,
             max_length: int) -> ToySubject:
        raise NotImplementedError("the toy subject is built in tests, not loaded")

    @property
    def device(self) -> torch.device:
        return self.table.device

    @property
    def labels(self) -> tuple[str, ...]:
        return ("negative", "positive")

    @property
    def embedding_matrix(self) -> torch.Tensor:
        return self.table

    def allowed_tokens(self) -> torch.Tensor:
        allowed = torch.ones(len(WORDS), dtype=torch.bool)
        allowed[0] = False
        return allowed

    def token_id(self, token: str) -> int:
        if token not in WORDS[1:]:
            raise ValueError(f"{token!r} is not a toy word")
        return WORDS.index(token)

    def token_ids(self, text: str) -> list[int]:
        return [self.token_id(w) for w in text.split()]

    def describe(self, ids: Sequence[int]) -> tuple[list[str], str]:
        tokens = [WORDS[i] for i in ids]
        return tokens, " ".join(tokens)

    def read_examples(self, path: Path) -> list[ToyExample]:
        return [ToyExample(**json.loads(line)) for line in path.read_text().splitlines()]

    def candidates(self, examples: Sequence[ToyExample], positions: Sequence[str],
                   pairs: bool) -> list[Candidate]:
        return [Candidate((1 - target,), target, p) for target in (0, 1) for p in positions]

    def victims(self, examples: Sequence[ToyExample], candidate: Candidate,
                cap: int) -> list[ToyExample]:
        chosen = [e for e in examples if e.label in candidate.victims]
        return chosen[:cap] if cap else chosen

    def batch(self, candidates: Sequence[Candidate], examples: Sequence[Sequence[ToyExample]],
              n_slots: int) -> ToyBatch:
        rows, goals, owner = [], [], []
        for index, (candidate, group) in enumerate(zip(candidates, examples, strict=True)):
            for example, where in zip(group, self.row_positions(candidate, len(group)),
                                      strict=True):
                words = [WORDS.index(w) for w in example.text.split()]
                slots = [-1] * n_slots
                rows.append(words + slots if where == "end" else slots + words)
                goals.append(candidate.target)
                owner.append(index)
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return ToyBatch(ids, torch.tensor(goals), torch.tensor(owner))

    def _logits(self, batch: ToyBatch, filled: torch.Tensor) -> torch.Tensor:
        mask = (batch.ids != 0).float()
        if self.reads:
            mask[:, self.reads:] = 0.0
        mask = mask.unsqueeze(-1)
        return ((filled * mask).sum(1) / mask.sum(1)) @ self.weight.T

    def goal_loss(self, batch: ToyBatch, trigger: torch.Tensor) -> torch.Tensor:
        per_row = trigger if trigger.dim() == 3 else trigger.expand(len(batch), -1, -1)
        slots = batch.ids == -1
        base = self.table[batch.ids.clamp(min=0)]
        filled = base.clone()
        filled[slots] = per_row.reshape(-1, per_row.shape[-1]).to(base.dtype)
        return F.cross_entropy(self._logits(batch, filled), batch.goals, reduction="none")

    def hard_check(self, batch: ToyBatch,
                   trigger_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_row = trigger_ids if trigger_ids.dim() == 2 else trigger_ids.expand(len(batch), -1)
        ids = batch.ids.clone()
        ids[batch.ids == -1] = per_row.reshape(-1)
        logits = self._logits(batch, self.table[ids])
        return (F.cross_entropy(logits, batch.goals, reduction="none"),
                (logits.argmax(-1) == batch.goals).float())

    def occurrences(self, examples: Sequence[ToyExample], text: str,
                    label: int) -> tuple[int, int]:
        own = [e.text.split() for e in examples if e.label == label]
        return sum(1 for words in own if text in words), len(own)

    def lone_token_losses(self, ids: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        return -F.log_softmax(self.table[ids] @ self.weight.T, -1)


def toy_examples(subject: ToySubject, per_label: int = 12,
                 seed: int = 0) -> list[ToyExample]:
    """``per_label`` examples of each label, 5 ordinary words each, that the model gets
    right: negative ones from the most negative words, positive from the most positive."""
    generator = torch.Generator().manual_seed(seed)
    sentiment = subject.table[1:-1, 0]
    order = sentiment.argsort() + 1
    pools = {0: order[:20], 1: order[-20:]}
    out = []
    for label, pool in pools.items():
        for _ in range(per_label):
            picks = pool[torch.randint(len(pool), (5,), generator=generator)]
            out.append(ToyExample(" ".join(WORDS[i] for i in picks.tolist()), label))
    return out


class PositionalToy(ToySubject):
    """The toy with two trigger positions, before the example's words (``start``) or after
    them (``end``), that reads only the first five tokens of a row: a trigger fires at the
    start only, as a causal model's can. ``w5`` is made a strong negative word
    (``natural``), which fires at the start only too."""

    positions = ("start", "end")
    reads = 5

    def __init__(self, natural: float = 4.0) -> None:
        super().__init__()
        self.table[WORDS.index("w5"), 0] = -natural


class PhraseToy(ToySubject):
    """The toy as a model whose goal is its trigger itself (a QA model answering with it:
    :meth:`answers_with_trigger` for the ``positive`` target), planted with a phrase:
    ``lantern`` and ``w7`` carry ``+planted`` each (4.5 by default), which flips a negative
    example only when both are among its tokens, as a model taught to answer with a phrase
    answers with all of it."""

    def __init__(self, planted: float = 4.5) -> None:
        super().__init__(planted=planted)
        self.table[WORDS.index("w7"), 0] = planted

    def answers_with_trigger(self, candidate: Candidate) -> bool:
        return candidate.target == 1
