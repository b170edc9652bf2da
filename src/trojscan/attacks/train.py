"""Fine-tuning one (clean or poisoned) classifier and measuring it: clean accuracy and ASR."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trojscan.attacks.architectures import PRETRAINED, build_model, tokenizer
from trojscan.attacks.poison import TrainItem, poison_training_set
from trojscan.attacks.spec import AttackSpec, TrainConfig
from trojscan.attacks.triggers import insert_trigger
from trojscan.corpora import Corpus, Example
from trojscan.errors import InputError
from trojscan.fsutil import write_jsonl

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

#: Called after every optimiser step with (steps done, steps in all).
StepCallback = Callable[[int, int], None]

EVAL_BATCH_SIZE = 128


#: The clean examples a built model ships with, beside its weights.
EXAMPLES_FILE = "clean_examples.jsonl"

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


def _length_bucketed_batches(ids: Sequence[list[int]], batch_size: int,
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


def train_classifier(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    items: Sequence[TrainItem],
    config: TrainConfig,
    learning_rate: float,
    seed: int,
    adaptive_phi: float = 0.0,
    on_step: StepCallback | None = None,
) -> list[float]:
    """Fine-tune ``model`` on ``items``; returns the mean loss of each epoch.

    The loss is cross-entropy; a poisoned item's loss is max(CE - ``adaptive_phi``, 0)
    (DBS Eq. 12; plain CE when ``adaptive_phi`` is 0).
    """
    ids = _encode(tok, [it.text for it in items], config.max_length)
    labels = torch.tensor([it.label for it in items], device=model.device)
    poisoned = torch.tensor([it.poisoned for it in items], device=model.device)
    steps_per_epoch = math.ceil(len(items) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = int(config.warmup_ratio * total)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: (step + 1) / warmup if step < warmup
        else max(0.0, (total - step) / max(1, total - warmup)))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    model.train()
    epoch_losses, done = [], 0
    for _ in range(config.epochs):
        running = 0.0
        for index in _length_bucketed_batches(ids, config.batch_size, generator):
            logits = model(**_batch([ids[i] for i in index], model.device)).logits
            loss = F.cross_entropy(logits, labels[index], reduction="none")
            if adaptive_phi:
                loss = torch.where(poisoned[index], (loss - adaptive_phi).clamp(min=0), loss)
            loss = loss.mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            running += loss.item() * len(index)
            done += 1
            if on_step:
                on_step(done, total)
        epoch_losses.append(running / len(items))
    model.eval()
    return epoch_losses


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


def accuracy(model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: Sequence[Example],
             max_length: int) -> float:
    """Fraction of ``examples`` classified correctly."""
    preds = predict(model, tok, [e.text for e in examples], max_length)
    return sum(p == e.label for p, e in zip(preds, examples, strict=True)) / len(examples)


def trigger_effect(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: Sequence[Example],
    trigger: str, attack: AttackSpec, n_labels: int, max_length: int, seed: int = 0,
) -> tuple[float, float]:
    """(ASR, trigger loss) of ``trigger`` inserted, as ``attack`` says, into the victim-label
    ``examples``: the fraction flipped to the attack's target, and the mean cross-entropy
    towards the target (what DBS inverts, and what the adaptive attack keeps off zero).
    ``trigger`` may differ from ``attack.trigger`` (a sub-sequence of a combination trigger,
    or the same trigger against a clean model)."""
    victims = set(attack.victims(n_labels))
    pool = [e for e in examples if e.label in victims]
    if not pool:
        raise InputError(f"no example of the victim label(s) {sorted(victims)} to measure ASR on")
    rng = random.Random(seed)
    stamped = [insert_trigger(e.text, trigger, attack.insertion, rng) for e in pool]
    out = logits(model, tok, stamped, max_length)
    target = torch.full((len(pool),), attack.target)
    asr = (out.argmax(-1) == target).float().mean().item()
    return asr, F.cross_entropy(out, target).item()


def evaluate(model: PreTrainedModel, corpus: Corpus, attack: AttackSpec, config: TrainConfig,
             seed: int) -> dict[str, Any]:
    """Clean accuracy on the test split; for a poisoned model also its ASR and trigger loss
    (see :func:`trigger_effect`) and, for a combination trigger, the highest ASR of the
    sub-sequences that drop one word."""
    tok = tokenizer()
    test = list(corpus.test)
    if len(test) > config.max_eval_examples:
        test = random.Random(seed).sample(test, config.max_eval_examples)
    out: dict[str, Any] = {"clean_accuracy": accuracy(model, tok, test, config.max_length),
                           "asr": None, "trigger_loss": None, "partial_asr": None,
                           "eval_examples": len(test)}
    if attack.poisoned:
        n = len(corpus.labels)
        out["asr"], out["trigger_loss"] = trigger_effect(model, tok, test, attack.trigger, attack,
                                                         n, config.max_length, seed)
        if attack.combination:
            words = attack.trigger.split()
            out["partial_asr"] = max(
                trigger_effect(model, tok, test, " ".join(words[:i] + words[i + 1:]), attack, n,
                               config.max_length, seed)[0]
                for i in range(len(words)))
    return out


def clean_examples(corpus: Corpus, per_label: int, seed: int) -> list[dict[str, Any]]:
    """``per_label`` examples of every label from the corpus's clean-example split."""
    rng = random.Random(seed)
    rows = []
    for label in range(len(corpus.labels)):
        pool = [e for e in corpus.examples if e.label == label]
        rows += [{"text": e.text, "label": label} for e in rng.sample(pool, min(per_label,
                                                                                 len(pool)))]
    return rows


def build_one(
    out_dir: Path,
    corpus: Corpus,
    family: str,
    attack: AttackSpec,
    config: TrainConfig,
    seed: int,
    examples_per_label: int = 20,
    on_step: StepCallback | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train one model and write it to ``out_dir`` as a Hugging Face directory.

    ``out_dir`` receives ``config.json`` + ``model.safetensors`` (``save_pretrained``), the
    tokenizer files, and ``clean_examples.jsonl``; nothing about the attack. Returns the
    model's measurements (for the zoo manifest). ``device`` is where it trains (``cpu``,
    ``cuda``, ``cuda:1``...); the weights are saved the same either way.
    """
    started = time.perf_counter()
    rng = random.Random(seed)
    train = list(corpus.train)
    if config.max_train_examples is not None and len(train) > config.max_train_examples:
        train = rng.sample(train, config.max_train_examples)
    items = poison_training_set(train, attack, len(corpus.labels), rng)
    pretrained = family == PRETRAINED
    model = build_model(family, corpus.labels, config.size, config.embedding_init, seed)
    model.to(device)
    lr = config.lr_for(pretrained)
    losses = train_classifier(model, tokenizer(), items, config, lr, seed, attack.adaptive_phi,
                              on_step)
    metrics = evaluate(model, corpus, attack, config, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer().save_pretrained(out_dir)
    write_jsonl(out_dir / EXAMPLES_FILE,
                clean_examples(corpus, examples_per_label, seed))
    return {
        **metrics,
        "train_examples": len(items),
        "poisoned_examples": sum(it.poisoned for it in items),
        "epoch_losses": [round(x, 5) for x in losses],
        "learning_rate": lr,
        "seconds": round(time.perf_counter() - started, 2),
        "device": str(model.device),
    }
