"""T-Miner (Azizi et al., USENIX Security 2021) at small scale, DBS's T-Miner baseline
(Table 1).

T-Miner trains a *perturbation generator* against the suspect classifier: a GRU sequence-to-
sequence model that rewrites an input so that the classifier's label flips to the target while
the text stays close to the input. Tokens the generator keeps putting in are trigger
candidates; each is then inserted into inputs of the victim class and kept when it flips them
(T-Miner's authors go on to pick outliers among the survivors in the classifier's hidden
space; a scan's threshold on the loss takes that place here).

The generator, as in the authors' code (``ctrl_gen_model_topk.py``, after Hu et al.'s
controlled generation): an encoder GRU reads the input; a label code (learned, one per label)
and the encoder's final state set the decoder's initial state; the decoder GRU emits one token
per input token. Its losses, weighted as in the authors' code (``lambda_ae`` 1.0,
``lambda_D`` 0.5, ``lambda_diversity`` 0.03):

* reconstruction: with the input's own label code, cross-entropy of the input tokens;
* classification: with the target's label code, the output is sampled by Gumbel-softmax and
  kept soft, as the authors' ``GumbelSoftmaxEmbeddingHelper`` does; the subject reads the soft
  sequence (its embedding matrix times the soft one-hots, between [CLS] and [SEP]) and its
  cross-entropy towards the target is the loss;
* diversity: the entropy of the batch mean of ``clip(p - onehot(input), 1e-8, 1)`` over the
  output distribution ``p`` of the reconstruction pass (the authors' code).

First ``pretrain_epochs`` steps train reconstruction alone (the authors' auto-encoder-only
epochs), then ``epochs`` steps train all three. Then the generator rewrites the victims
greedily with the target's code; a token counts as inserted into a victim where the output
differs from the input, and the ``trigger_length`` tokens inserted into the most victims
(ties, and a shortfall, broken by the generator's probability mass on non-input tokens) are the
candidates. The ASR test puts each candidate alone into the victims at the task's position;
the reported trigger is all candidates, best single-token loss first, measured together as
hard tokens. It is a real token sequence: ``relaxed_loss`` repeats ``hard_loss`` and
``accepted`` is True; the candidates with their counts, losses and ASRs are the trajectory's
``event: "candidates"`` entry.

Small scale, departures from the authors' settings (their GRUs have 1,000 units with
attention, trained for tens of epochs over a large corpus of random-word sentences): the
generator has ``hidden_size`` units and uses the subject's tokenizer and (frozen) token
embeddings, for input and, tied, for output, so its vocabulary is the subject's; in place of
attention, the decoder step at position t reads the encoder output at t and the input token
before t (so the whole pass runs at once), and the input token at t gets ``copy_prior`` added
to its logit, a head start at copying that does not saturate (a learned copy score makes the
reconstruction of a few victims exact, and the classifier's gradient vanishes); the inputs are
the task's victims (a scan has clean examples, the authors' setting had none), cut to
``seq_len`` tokens (the authors' ``seq_len`` 16). Learning rate, step counts, the Gumbel
temperature and the copy prior are ours, chosen so that a CPU trains it in seconds to minutes.

Evaluations (see :mod:`trojscan.inversion.common`): 1 per training step with the classifier
loss (the pre-training steps use no subject), ``trigger_length`` for the ASR test, 1 for the
final measurement.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
from trojscan.subjects.base import Candidate
from trojscan.subjects.text_classification import (
    SlotBatch,
    TextClassificationSubject,
    TextExample,
)


@dataclass(frozen=True)
class TMinerConfig:
    """T-Miner's knobs.

    Attributes:
        trigger_length: candidates tested and put in the reported trigger (DBS Appendix A:
            triggers of 10).
        epochs: generator training steps with all three losses, one pass over the victims
            each (DBS Appendix A's 200 optimisation epochs).
        pretrain_epochs: reconstruction-only steps before them (no subject evaluations).
        seq_len: victims are cut to this many tokens (authors' code: 16).
        hidden_size: units of the generator's GRUs (authors' code: 1,000; small here).
        learning_rate: Adam's rate for the generator (ours; the authors' 5e-4 is for tens of
            epochs over a large corpus).
        reconstruction_weight: lambda_ae (authors' code: 1.0).
        classification_weight: lambda_D (authors' code: 0.5).
        diversity_weight: lambda_diversity (authors' code: 0.03).
        gumbel_temperature: temperature of the relaxed samples (ours).
        copy_prior: added to the logit of the input token at its own position (ours, in place
            of the authors' attention; e^5 against ~30,500 tokens starts the input token at
            about 0.5%: a head start at copying, learnt further by reconstruction). With 10
            the reconstruction of the victims became exact in a few steps and the classifier's
            gradient vanished: no victim was ever rewritten.
        max_evaluations: cap on evaluations per task (see the module docstring); None leaves
            ``epochs`` to bound them. Training stops where a step would not fit; the cap must
            fit the ASR test and the final measurement.
        chunk_rows: at most this many rows per forward pass of the ASR test.
        seed: seeds the generator's weights and the Gumbel noise.
    """

    trigger_length: int = 10
    epochs: int = 200
    pretrain_epochs: int = 20
    seq_len: int = 16
    hidden_size: int = 64
    learning_rate: float = 0.05
    reconstruction_weight: float = 1.0
    classification_weight: float = 0.5
    diversity_weight: float = 0.03
    gumbel_temperature: float = 0.5
    copy_prior: float = 5.0
    max_evaluations: int | None = None
    chunk_rows: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.trigger_length, self.epochs, self.seq_len, self.hidden_size,
               self.chunk_rows) < 1:
            raise ValueError("trigger_length, epochs, seq_len, hidden_size and chunk_rows must "
                             "be >= 1")
        if self.pretrain_epochs < 0:
            raise ValueError("pretrain_epochs must be >= 0")
        if self.learning_rate <= 0 or self.gumbel_temperature <= 0 or self.copy_prior < 0:
            raise ValueError("learning_rate and gumbel_temperature must be > 0, copy_prior >= 0")
        if min(self.reconstruction_weight, self.classification_weight,
               self.diversity_weight) < 0:
            raise ValueError("the loss weights must be >= 0")
        check_budget(self.max_evaluations, self.tail_evaluations())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    def tail_evaluations(self) -> int:
        """Evaluations after training: the ASR test and the final measurement."""
        return self.trigger_length + FINAL_EVALUATIONS


class _Generator(nn.Module):
    """Encoder-decoder GRU over the subject's vocabulary and (frozen) token embeddings."""

    def __init__(self, embeddings: torch.Tensor, first: int, labels: int, hidden: int,
                 copy_prior: float) -> None:
        super().__init__()
        self.embeddings = embeddings  # (V, d), the subject's; not a parameter
        self.first = first  # the token id the decoder reads before the first position
        self.copy_prior = copy_prior
        width = embeddings.shape[1]
        self.read = nn.Linear(width, hidden)
        self.encoder = nn.GRU(hidden, hidden, batch_first=True)
        self.code = nn.Embedding(labels, hidden)
        self.start = nn.Linear(2 * hidden, hidden)
        self.decoder = nn.GRU(2 * hidden, hidden, batch_first=True)
        self.write = nn.Linear(hidden, width)
        self.bias = nn.Parameter(torch.zeros(len(embeddings)))

    def forward(self, ids: torch.Tensor, codes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """(B, T, V) output logits for the (B, T) input ``ids`` under each (B,) tensor of
        label ``codes`` (the input is encoded once). Position t's decoder step reads the
        encoder output at t and the input token before t; the input token at t gets
        ``copy_prior`` added to its logit."""
        read = self.read(self.embeddings[ids])
        encoded, final = self.encoder(read)
        before = self.read(self.embeddings[self.first]).expand(len(ids), 1, -1)
        steps = torch.cat([torch.cat([before, read[:, :-1]], 1), encoded], -1)
        prior = torch.full((*ids.shape, 1), float(self.copy_prior), device=ids.device)
        out = []
        for labels in codes:
            state = torch.tanh(self.start(torch.cat([final[0], self.code(labels)], -1)))
            states, _ = self.decoder(steps, state.unsqueeze(0))
            logits = self.write(states) @ self.embeddings.T + self.bias
            out.append(logits.scatter_add_(-1, ids.unsqueeze(-1), prior))
        return out


@dataclass
class _Victims:
    """The victims as generator input: (B, T) ids cut to ``seq_len``, (B, T) validity, and
    the subject's rows for generated text of each length (row indices, length, slot batch)."""

    ids: torch.Tensor
    valid: torch.Tensor
    groups: list[tuple[torch.Tensor, int, SlotBatch]]


def _victims(subject: TextClassificationSubject, task: InversionTask, seq_len: int) -> _Victims:
    tokenised = [subject.token_ids(e.text)[:seq_len] or [subject.pad_id] for e in task.examples]
    width = max(len(t) for t in tokenised)
    ids = torch.full((len(tokenised), width), subject.pad_id, dtype=torch.long)
    for row, tokens in enumerate(tokenised):
        ids[row, : len(tokens)] = torch.tensor(tokens)
    lengths = torch.tensor([len(t) for t in tokenised])
    valid = torch.arange(width) < lengths.unsqueeze(1)
    groups = []
    for length in lengths.unique().tolist():
        rows = (lengths == length).nonzero().squeeze(-1)
        # [CLS] + ``length`` slots + [SEP]: the generated text fills the slots.
        empty = [TextExample("", task.examples[r].label) for r in rows.tolist()]
        at_start = Candidate(task.candidate.victims, task.candidate.target, "start")
        groups.append((rows.to(subject.device), length,
                       subject.batch([at_start], [empty], length)))
    return _Victims(ids.to(subject.device), valid.to(subject.device), groups)


def _diversity(probs: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The authors' diversity loss: entropy of the batch mean of clip(p - onehot(ids), 1e-8, 1)
    over the (B, T, V) output distribution p (off the input token that is p, on it 1e-8)."""
    diff = probs.clamp_min(1e-8).scatter(-1, ids.unsqueeze(-1), 1e-8) * valid.unsqueeze(-1)
    mean = diff.sum(0) / valid.sum(0).clamp_min(1).unsqueeze(-1)
    return -(mean * mean.clamp_min(1e-8).log()).sum()


def _relaxed(logits: torch.Tensor, embeddings: torch.Tensor, excluded: torch.Tensor,
             config: TMinerConfig, noise: torch.Generator) -> torch.Tensor:
    """(B, T, d) embeddings of a Gumbel-softmax sample of the output at
    ``gumbel_temperature`` (soft, as the authors' ``GumbelSoftmaxEmbeddingHelper``)."""
    u = torch.rand(logits.shape, generator=noise, device=logits.device)
    gumbel = -(-u.clamp(1e-10, 1 - 1e-10).log()).log()
    sample = torch.softmax((logits + excluded + gumbel) / config.gumbel_temperature, -1)
    return sample @ embeddings


def _invert_one(subject: TextClassificationSubject, task: InversionTask, config: TMinerConfig,
                tick: Callable[[int], None]) -> Inversion:
    started = time.perf_counter()
    budget = Budget(config.max_evaluations)
    device = subject.device
    embeddings = subject.embedding_matrix.detach()
    excluded = torch.where(subject.allowed_tokens(), 0.0, -torch.inf)
    victims = _victims(subject, task, config.seq_len)
    own = torch.tensor([e.label for e in task.examples], device=device)
    target = torch.full_like(own, task.candidate.target)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        generator = _Generator(embeddings, subject.cls_id, len(subject.labels),
                               config.hidden_size, config.copy_prior).to(device)
    noise = torch.Generator(device=device).manual_seed(config.seed)
    optimiser = torch.optim.Adam(generator.parameters(), lr=config.learning_rate)
    ids, valid = victims.ids, victims.valid
    trajectory: list[dict[str, Any]] = []
    for step in range(config.pretrain_epochs + config.epochs):
        adversarial = step >= config.pretrain_epochs
        if adversarial and not budget.affords(1, keep=config.tail_evaluations()):
            break
        logits, *flipped = generator(ids, [own, target] if adversarial else [own])
        log_probs = torch.log_softmax(logits, -1)
        reconstruction = F.nll_loss(log_probs[valid], ids[valid])
        loss = config.reconstruction_weight * reconstruction
        if adversarial:
            soft = _relaxed(flipped[0], embeddings, excluded, config, noise)
            budget.spend(1)
            classification = torch.zeros((), device=device)
            for rows, length, batch in victims.groups:
                classification = classification + subject.goal_loss(
                    batch, soft[rows, :length]).sum()
            classification = classification / len(own)
            diversity = _diversity(log_probs.exp(), ids, valid)
            loss = (loss + config.classification_weight * classification
                    + config.diversity_weight * diversity)
            epoch = step - config.pretrain_epochs
            trajectory.append({"epoch": epoch, "loss": classification.item(),
                               "reconstruction": reconstruction.item(),
                               "diversity": diversity.item(), "evaluations": budget.used})
            tick(epoch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    epochs = len(trajectory)
    candidates, entry = _candidates(subject, task, generator, victims, excluded, budget, config)
    trajectory.append({"epoch": epochs, "event": "candidates", **entry})
    return finish(TMiner.name, subject, task, victim_batch(subject, task, config.trigger_length),
                  candidates, budget, started, epochs, trajectory, config.chunk_rows)


@torch.no_grad()
def _candidates(subject: TextClassificationSubject, task: InversionTask, generator: _Generator,
                victims: _Victims, excluded: torch.Tensor, budget: Budget,
                config: TMinerConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """Rewrite the victims greedily towards the target, rank the inserted tokens, ASR-test
    the top ``trigger_length``; (their ids, best single-token loss first; trajectory entry)."""
    ids, valid = victims.ids, victims.valid
    (logits,) = generator(ids, [torch.full((len(ids),), task.candidate.target,
                                           device=ids.device)])
    logits = logits + excluded
    output = logits.argmax(-1)
    inserted = valid & (output != ids)
    counts: Counter[int] = Counter()
    for row in range(len(ids)):
        counts.update(set(output[row][inserted[row]].tolist()))
    # Ties and a shortfall: the probability mass the generator puts on non-input tokens.
    probs = torch.softmax(logits, -1) * valid.unsqueeze(-1)
    mass = probs.scatter(-1, ids.unsqueeze(-1), 0.0).sum((0, 1))
    rank = mass / (mass.sum() + 1)
    for token, count in counts.items():
        rank[token] += count
    top = rank.topk(config.trigger_length).indices
    single = victim_batch(subject, task, 1)
    losses, asrs = score_triggers(subject, single, top.view(-1, 1), budget, config.chunk_rows)
    order = losses.argsort(stable=True)
    names, _ = subject.describe(top.tolist())
    rows = [{"token": names[i], "inserted_into": counts[int(top[i])],
             "loss": losses[i].item(), "asr": asrs[i].item()} for i in order.tolist()]
    entry = {"loss": rows[0]["loss"], "evaluations": budget.used,
             "rewritten": int(inserted.any(1).sum()), "candidates": rows}
    return top[order], entry


@register("tminer")
class TMiner(OneByOne):
    """T-Miner's perturbation generator, one task after another (text classifiers only: it
    rewrites whole sentences)."""

    config_class = TMinerConfig
    subject_classes = (TextClassificationSubject,)

    def invert_one(self, subject: TextClassificationSubject, task: InversionTask,
                   generator: torch.Generator, tick: Callable[[int], None]) -> Inversion:
        """T-Miner on one task (seeded by ``config.seed`` itself, per task: ``generator`` is
        not drawn from)."""
        return _invert_one(subject, task, self.config, tick)
