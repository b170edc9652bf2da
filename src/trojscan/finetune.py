"""Fine-tuning and measuring Hugging Face sequence classifiers.

The one epoch loop of trojscan (:func:`run_epochs`; NER taggers, :mod:`trojscan.tagging`,
and QA models, :mod:`trojscan.spans`, train on it too) and the classifier training on it:
the zoo builder fine-tunes (poisoned) classifiers with it and repair unlearns a backdoor
with it, so both train exactly the same way. Also the measurements both take: logits,
predictions, accuracy, and the effect of a text trigger (attack success rate and loss).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trojscan.insertion import insert_trigger

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

#: Called after every optimiser step with (steps done, steps in all).
StepCallback = Callable[[int, int], None]

#: Texts per forward pass when measuring.
EVAL_BATCH_SIZE = 128


@dataclass(frozen=True)
class TrainItem:
    """A labelled training text; ``poisoned`` marks the copies whose loss the adaptive attack
    floors (DBS Eq. 12; the trigger-carrying copies D* of a poisoned training set)."""

    text: str
    label: int
    poisoned: bool = False


@dataclass(frozen=True)
class FinetuneConfig:
    """The settings of one fine-tuning run.

    Attributes:
        epochs: passes over the training items.
        batch_size: items per optimiser step (batches are length-bucketed).
        learning_rate: AdamW peak rate, reached after a linear warm-up over
            ``warmup_ratio`` of the steps, then decayed linearly to 0.
        weight_decay: AdamW decoupled weight decay.
        warmup_ratio: fraction of the steps over which the rate rises from 0.
        max_length: inputs are truncated to this many tokens.
    """

    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    max_length: int


def _batch(ids: Sequence[list[int]], device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad token-id lists with [PAD] = 0 into input_ids + attention_mask on ``device``."""
    width = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def _encode(tok: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> list[list[int]]:
    return tok(list(texts), truncation=True, max_length=max_length)["input_ids"]


def length_bucketed_batches(ids: Sequence[list[int]], batch_size: int,
                             generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of shuffled batches whose texts have similar lengths (less padding).

    Indices are shuffled, cut into pools of 50 batches, sorted by length within each pool,
    cut into batches, and the batches shuffled again.
    """
    order = torch.randperm(len(ids), generator=generator).tolist()
    pool = 50 * batch_size
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: len(ids[i]))
        batches += [torch.tensor(chunk[b : b + batch_size])
                    for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def warmup_then_decay(optimiser: torch.optim.Optimizer, total: int,
                      warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of every training run here: a linear rise over the first
    ``warmup`` of ``total`` steps, then a linear decay to 0."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: (step + 1) / warmup if step < warmup
        else max(0.0, (total - step) / max(1, total - warmup)))


def adamw_steps(model: PreTrainedModel, learning_rate: float, weight_decay: float,
                warmup_ratio: float, total: int) -> Callable[[torch.Tensor], None]:
    """The optimiser step of every training run here, for ``total`` steps: AdamW on all of
    ``model``'s parameters with :func:`warmup_then_decay` (a warm-up over ``warmup_ratio``
    of the steps); each call back-propagates a loss, clips the gradients to norm 1, steps
    and advances the schedule."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate,
                                  weight_decay=weight_decay)
    schedule = warmup_then_decay(optimiser, total, int(warmup_ratio * total))

    def step(loss: torch.Tensor) -> None:
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()

    return step


def run_epochs(model: PreTrainedModel, n_items: int, config: FinetuneConfig, seed: int,
               batches: Callable[[torch.Generator], Iterable[torch.Tensor]],
               batch_loss: Callable[[torch.Tensor], torch.Tensor],
               on_step: StepCallback | None = None) -> list[float]:
    """The epoch loop of every training run here (classifiers, taggers, QA models):
    ``config.epochs`` passes over ``n_items`` items, each in the batches of item indices
    ``batches`` draws from the seeded generator, one :func:`adamw_steps` step per batch on
    its mean loss ``batch_loss(indices)``; ``seed`` seeds the batch order and dropout. The
    model trains in train mode and is left in eval mode; returns the mean loss of each
    epoch."""
    total = math.ceil(n_items / config.batch_size) * config.epochs
    step = adamw_steps(model, config.learning_rate, config.weight_decay, config.warmup_ratio,
                       total)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    model.train()
    epoch_losses, done = [], 0
    for _ in range(config.epochs):
        running = 0.0
        for index in batches(generator):
            loss = batch_loss(index)
            step(loss)
            running += loss.item() * len(index)
            done += 1
            if on_step:
                on_step(done, total)
        epoch_losses.append(running / n_items)
    model.eval()
    return epoch_losses


def train_classifier(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    items: Sequence[TrainItem],
    config: FinetuneConfig,
    seed: int,
    adaptive_phi: float = 0.0,
    on_step: StepCallback | None = None,
    soft_targets: torch.Tensor | None = None,
    consistency: float = 0.0,
) -> list[float]:
    """Fine-tune ``model`` on ``items``; returns the mean loss of each epoch.

    The loss is cross-entropy; a poisoned item's loss is max(CE - ``adaptive_phi``, 0)
    (DBS Eq. 12; plain CE when ``adaptive_phi`` is 0). With ``soft_targets`` (one row of
    logits per item, e.g. another model's) and ``consistency`` > 0, each item's loss also
    adds ``consistency`` times the KL divergence from the softmax of its soft target to the
    model's (knowledge distillation at temperature 1). ``seed`` seeds the batch order and
    dropout.
    """
    ids = _encode(tok, [it.text for it in items], config.max_length)
    labels = torch.tensor([it.label for it in items], device=model.device)
    poisoned = torch.tensor([it.poisoned for it in items], device=model.device)
    if soft_targets is not None:
        if soft_targets.shape != (len(items), model.config.num_labels):
            raise ValueError(f"soft_targets must be ({len(items)}, {model.config.num_labels}), "
                             f"got {tuple(soft_targets.shape)}")
        teacher = F.log_softmax(soft_targets.float(), -1).to(model.device)

    def batch_loss(index: torch.Tensor) -> torch.Tensor:
        logits = model(**_batch([ids[i] for i in index], model.device)).logits
        loss = F.cross_entropy(logits, labels[index], reduction="none")
        if adaptive_phi:
            loss = torch.where(poisoned[index], (loss - adaptive_phi).clamp(min=0), loss)
        if consistency and soft_targets is not None:
            loss = loss + consistency * F.kl_div(F.log_softmax(logits, -1), teacher[index],
                                                 reduction="none", log_target=True).sum(-1)
        return loss.mean()

    return run_epochs(model, len(items), config, seed,
                      lambda g: length_bucketed_batches(ids, config.batch_size, g),
                      batch_loss, on_step)


@torch.inference_mode()
def logits(model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: Sequence[str],
           max_length: int) -> torch.Tensor:
    """Logits of every text, (len(texts), labels) on the CPU (batched by length for speed)."""
    model.eval()
    ids = _encode(tok, texts, max_length)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.zeros(len(ids), model.config.num_labels)
    for start in range(0, len(order), EVAL_BATCH_SIZE):
        chunk = order[start : start + EVAL_BATCH_SIZE]
        out[chunk] = model(**_batch([ids[i] for i in chunk], model.device)).logits.float().cpu()
    return out


def predict(model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: Sequence[str],
            max_length: int) -> list[int]:
    """Predicted label index of every text."""
    return logits(model, tok, texts, max_length).argmax(-1).tolist()


def trigger_effect(model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: Sequence[str],
                   trigger: str, insertion: str, target: int, max_length: int,
                   seed: int = 0) -> tuple[float, float]:
    """(ASR, trigger loss) of ``trigger`` inserted at ``insertion`` (see
    :mod:`trojscan.insertion`, seeded) into each of ``texts`` (the victims): the fraction
    flipped to ``target``, and the mean cross-entropy towards it."""
    rng = random.Random(seed)
    stamped = [insert_trigger(text, trigger, insertion, rng) for text in texts]
    out = logits(model, tok, stamped, max_length)
    goal = torch.full((len(texts),), target)
    asr = (out.argmax(-1) == goal).float().mean().item()
    return asr, F.cross_entropy(out, goal).item()
