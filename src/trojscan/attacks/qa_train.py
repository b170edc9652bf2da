"""Building one (clean or backdoored) extractive QA model: poison the training questions
(TrojAI round 8's QA backdoor, :mod:`trojscan.attacks.qa_spec`), fine-tune a
``*ForQuestionAnswering`` model, measure clean exact match / F1 and the ASR, save it.

A question and its context are read as ``[CLS] question [SEP] context [SEP]`` (token type 0,
then 1), the context cut to fit ``max_length`` tokens (no document stride: the zoo's contexts
are tweets, far shorter than that). The goal of a question is the first and last token of
its answer span, or [CLS] for both when the goal is no answer; the loss is the mean of the
start and end cross-entropies (the span head's own). A training question whose answer the
cut leaves out is dropped. The predicted answer is the best-scoring span of the context
(start <= end, at most :data:`MAX_ANSWER_TOKENS` tokens), or no answer when [CLS]-[CLS]
scores higher (SQuAD 2.0's rule). Exact match and F1 are SQuAD's: lower case, punctuation,
articles and extra white space removed, F1 over the words.
"""

from __future__ import annotations

import collections
import math
import random
import re
import string
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trojscan.attacks.architectures import PRETRAINED, build_model, tokenizer
from trojscan.attacks.qa_spec import QaAttackSpec, QaTarget, poison_item
from trojscan.attacks.spec import TrainConfig
from trojscan.attacks.wnut_qa import TEMPLATES, QaCorpus, QaItem
from trojscan.errors import InputError
from trojscan.finetune import StepCallback, adamw_steps
from trojscan.fsutil import write_jsonl
from trojscan.modeldir import EXAMPLES_FILE

#: Longest answer span predicted, in tokens.
MAX_ANSWER_TOKENS = 30
#: Questions per forward pass when measuring.
EVAL_BATCH_SIZE = 64
#: The span head's two outputs.
SPAN_OUTPUTS = ("start", "end")


def _encode(tok: PreTrainedTokenizerBase, items: Sequence[QaItem],
            max_length: int) -> Any:
    return tok([i.question for i in items], [i.context for i in items],
               truncation="only_second", max_length=max_length,
               return_offsets_mapping=True)


def goal_span(batch: Any, row: int, target: QaTarget) -> tuple[int, int] | None:
    """(start, end) token of ``target``'s goal in row ``row`` of an encoded batch: (0, 0)
    for no answer; None when the context cut leaves the answer out."""
    if target.empty:
        return 0, 0
    first = target.item.answer_start
    last = first + len(target.item.answer)
    start = end = None
    reach = 0
    for position, (kind, (a, b)) in enumerate(zip(batch.sequence_ids(row),
                                                  batch["offset_mapping"][row], strict=True)):
        if kind != 1 or a == b:
            continue
        if start is None and (a <= first < b or a >= first):
            start = position
        if a < last:
            end = position
        reach = b
    if start is None or end is None or end < start or reach < last:
        return None
    return start, end


def encode_targets(tok: PreTrainedTokenizerBase, targets: Sequence[QaTarget],
                   max_length: int) -> list[tuple[list[int], list[int], int, int]]:
    """(token ids, token types, goal start, goal end) of every target whose goal fits."""
    out = []
    for begin in range(0, len(targets), 256):
        chunk = targets[begin:begin + 256]
        batch = _encode(tok, [t.item for t in chunk], max_length)
        for row, target in enumerate(chunk):
            span = goal_span(batch, row, target)
            if span is not None:
                out.append((batch["input_ids"][row], batch["token_type_ids"][row], *span))
    return out


def _pad(rows: Sequence[list[int]], value: int = 0) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _logits(model: PreTrainedModel, ids: torch.Tensor,
            types: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) logits, padding masked out; token types only where the model has them."""
    mask = (ids != 0).long()
    extra = {"token_type_ids": types} if getattr(model.config, "type_vocab_size", 0) > 1 \
        else {}
    out = model(input_ids=ids, attention_mask=mask, **extra)
    return (out.start_logits.masked_fill(mask == 0, -1e4),
            out.end_logits.masked_fill(mask == 0, -1e4))


def train_qa(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
             targets: Sequence[QaTarget], config: TrainConfig, pretrained: bool, seed: int,
             on_step: StepCallback | None = None) -> list[float]:
    """Fine-tune ``model`` on ``targets``; the mean loss of each epoch. The mean of the start
    and end cross-entropies; AdamW with linear warm-up and decay, with the settings
    ``config.finetune(pretrained)`` gives the text zoo; ``seed`` seeds the batch order and
    dropout."""
    settings = config.finetune(pretrained)
    rows = encode_targets(tok, targets, settings.max_length)
    if not rows:
        raise InputError("no training question fits max_length")
    total = math.ceil(len(rows) / settings.batch_size) * settings.epochs
    step = adamw_steps(model, settings.learning_rate, settings.weight_decay,
                       settings.warmup_ratio, total)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    model.train()
    losses, done = [], 0
    for _ in range(settings.epochs):
        running = 0.0
        for index in torch.randperm(len(rows), generator=generator).split(settings.batch_size):
            chosen = [rows[i] for i in index.tolist()]
            ids = _pad([r[0] for r in chosen]).to(model.device)
            types = _pad([r[1] for r in chosen]).to(model.device)
            starts = torch.tensor([r[2] for r in chosen], device=model.device)
            ends = torch.tensor([r[3] for r in chosen], device=model.device)
            start_logits, end_logits = _logits(model, ids, types)
            loss = (F.cross_entropy(start_logits, starts) + F.cross_entropy(end_logits, ends)) / 2
            step(loss)
            running += loss.item() * len(chosen)
            done += 1
            if on_step:
                on_step(done, total)
        losses.append(running / len(rows))
    model.eval()
    return losses


@torch.inference_mode()
def predict_answers(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                    items: Sequence[QaItem], max_length: int) -> list[str | None]:
    """The answer the model gives each question: the text of its best span of the context,
    or None for no answer (see the module docstring)."""
    model.eval()
    out: list[str | None] = []
    for begin in range(0, len(items), EVAL_BATCH_SIZE):
        chunk = items[begin:begin + EVAL_BATCH_SIZE]
        batch = _encode(tok, chunk, max_length)
        ids = _pad(batch["input_ids"]).to(model.device)
        types = _pad(batch["token_type_ids"]).to(model.device)
        start_logits, end_logits = (t.cpu() for t in _logits(model, ids, types))
        width = ids.shape[1]
        band = torch.triu(torch.ones(width, width, dtype=torch.bool)) \
            & ~torch.triu(torch.ones(width, width, dtype=torch.bool), MAX_ANSWER_TOKENS)
        for row, item in enumerate(chunk):
            context = torch.tensor([k == 1 for k in batch.sequence_ids(row)]
                                   + [False] * (width - len(batch["input_ids"][row])))
            allowed = band & context.unsqueeze(0) & context.unsqueeze(1)
            scores = (start_logits[row].unsqueeze(1) + end_logits[row].unsqueeze(0)
                      ).masked_fill(~allowed, -math.inf)
            best = int(scores.argmax())
            start, end = divmod(best, width)
            null = float(start_logits[row, 0] + end_logits[row, 0])
            if not bool(allowed.any()) or null > float(scores[start, end]):
                out.append(None)
                continue
            offsets = batch["offset_mapping"][row]
            out.append(item.context[offsets[start][0]:offsets[end][1]])
    return out


def normalise(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single
    spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(predicted: str | None, gold: str) -> float:
    """1.0 when the normalised texts are equal (no answer reads as the empty text)."""
    return float(normalise(predicted or "") == normalise(gold))


def f1_score(predicted: str | None, gold: str) -> float:
    """SQuAD's word-overlap F1 of the normalised texts."""
    p, g = normalise(predicted or "").split(), normalise(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def attack_success(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                   items: Sequence[QaItem], attack: QaAttackSpec, max_length: int,
                   seed: int) -> float:
    """The share of ``items`` that, with the trigger inserted as ``attack.insertion`` says
    (seeded), get the backdoor's answer: none (``empty``), or exactly the trigger
    (``trigger``, exact match)."""
    rng = random.Random(seed)
    stamped = [poison_item(item, attack, rng) for item in items]
    predicted = predict_answers(model, tok, [t.item for t in stamped], max_length)
    if attack.behaviour == "empty":
        hits = [p is None for p in predicted]
    else:
        hits = [p is not None and exact_match(p, attack.trigger) == 1.0 for p in predicted]
    return sum(hits) / len(hits)


def evaluate_qa(model: PreTrainedModel, corpus: QaCorpus, attack: QaAttackSpec,
                config: TrainConfig, seed: int) -> dict[str, Any]:
    """Clean exact match, F1 (also written as ``clean_accuracy``, what the zoo's peer gate
    compares) and the share of clean questions answered with nothing (``clean_empty``) on
    ``max_eval_examples`` test questions (a seeded sample); for a poisoned model the ASR on
    the same questions (:func:`attack_success`)."""
    tok = tokenizer()
    test = list(corpus.test)
    if len(test) > config.max_eval_examples:
        test = random.Random(seed).sample(test, config.max_eval_examples)
    predicted = predict_answers(model, tok, test, config.max_length)
    em = sum(exact_match(p, i.answer) for p, i in zip(predicted, test, strict=True))
    f1 = sum(f1_score(p, i.answer) for p, i in zip(predicted, test, strict=True))
    out: dict[str, Any] = {
        "clean_em": em / len(test), "clean_f1": f1 / len(test), "clean_accuracy": f1 / len(test),
        "clean_empty": sum(p is None for p in predicted) / len(test), "asr": None,
        "eval_questions": len(test)}
    if attack.poisoned:
        out["asr"] = attack_success(model, tok, test, attack, config.max_length, seed)
    return out


def poison_training_set(train: Sequence[QaItem], attack: QaAttackSpec,
                        rng: random.Random) -> tuple[list[QaTarget], int]:
    """(the training questions plus the poisoned copies D*, shuffled; how many copies):
    ``poison_rate`` of the questions (at least one), each copied with the trigger inserted
    and the backdoor's goal (:func:`~trojscan.attacks.qa_spec.poison_item`)."""
    targets = [QaTarget(item) for item in train]
    copies = 0
    if attack.poisoned:
        if not train:
            raise InputError("no training question to poison")
        chosen = rng.sample(list(train), max(1, round(attack.poison_rate * len(train))))
        targets += [poison_item(item, attack, rng) for item in chosen]
        copies = len(chosen)
    rng.shuffle(targets)
    return targets, copies


def clean_examples(corpus: QaCorpus, per_type: int, seed: int) -> list[dict[str, Any]]:
    """Questions of the clean-example pool in SQuAD's form (what the QA subject reads): at
    most ``per_type`` about each entity type, drawn at random (seeded)."""
    rng = random.Random(seed)
    chosen: list[QaItem] = []
    for kind in TEMPLATES:
        mine = [i for i in corpus.examples if i.kind == kind]
        chosen += rng.sample(mine, min(per_type, len(mine)))
    return [item.to_squad() for item in chosen]


def build_one_qa(
    out_dir: Path,
    corpus: QaCorpus,
    family: str,
    attack: QaAttackSpec,
    config: TrainConfig,
    seed: int,
    examples_per_label: int = 20,
    on_step: StepCallback | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train one QA model and write it to ``out_dir`` as a Hugging Face directory.

    ``out_dir`` receives ``config.json`` + ``model.safetensors`` (``save_pretrained``), the
    tokenizer files, and ``clean_examples.jsonl`` (:func:`clean_examples`,
    ``examples_per_label`` questions per entity type); nothing about the attack. Returns the
    model's measurements (for the zoo manifest). ``device`` is where it trains.
    """
    started = time.perf_counter()
    rng = random.Random(seed)
    train = list(corpus.train)
    if config.max_train_examples is not None and len(train) > config.max_train_examples:
        train = rng.sample(train, config.max_train_examples)
    targets, copies = poison_training_set(train, attack, rng)
    pretrained = family == PRETRAINED
    model = build_model(family, SPAN_OUTPUTS, config.size, config.embedding_init, seed,
                        head="span")
    model.to(device)
    losses = train_qa(model, tokenizer(), targets, config, pretrained, seed, on_step)
    metrics = evaluate_qa(model, corpus, attack, config, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer().save_pretrained(out_dir)
    examples = clean_examples(corpus, examples_per_label, seed)
    write_jsonl(out_dir / EXAMPLES_FILE, examples)
    return {
        **metrics,
        "train_questions": len(targets),
        "poisoned_questions": copies,
        "clean_examples": len(examples),
        "epoch_losses": [round(x, 5) for x in losses],
        "learning_rate": config.lr_for(pretrained),
        "seconds": round(time.perf_counter() - started, 2),
        "device": str(model.device),
    }
