"""Fine-tuning and measuring Hugging Face extractive QA models (span heads).

The one span loop of trojscan: the zoo builder fine-tunes (poisoned) QA models with it and
repair unlearns a QA backdoor with it, so both train exactly the same way; also what both
measure: the answer a model gives, SQuAD's exact match and F1.

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
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trojscan.errors import InputError
from trojscan.finetune import FinetuneConfig, StepCallback, run_epochs

#: Longest answer span predicted, in tokens.
MAX_ANSWER_TOKENS = 30
#: Questions per forward pass when measuring.
EVAL_BATCH_SIZE = 64
#: Logit given to padding, which no span may use.
PADDING_LOGIT = -1e4


class Asked(Protocol):
    """A question about a context."""

    @property
    def question(self) -> str: ...

    @property
    def context(self) -> str: ...


@dataclass(frozen=True)
class SpanGoal:
    """A question about a context and the answer it is trained towards: ``answer``, at
    character ``answer_start`` of the context, or no answer at all (``empty``: start = end =
    [CLS])."""

    question: str
    context: str
    answer: str = ""
    answer_start: int = 0
    empty: bool = False


def encode_pairs(tok: PreTrainedTokenizerBase, items: Sequence[Asked], max_length: int) -> Any:
    """The question-context pairs tokenised, the context cut to fit, with character offsets
    (a ``BatchEncoding``: ``sequence_ids(row)`` tells question (0) from context (1))."""
    return tok([i.question for i in items], [i.context for i in items],
               truncation="only_second", max_length=max_length,
               return_offsets_mapping=True)


def goal_span(batch: Any, row: int, goal: SpanGoal) -> tuple[int, int] | None:
    """(start, end) token of ``goal``'s answer in row ``row`` of :func:`encode_pairs`: (0, 0)
    for no answer; None when the context cut leaves the answer out."""
    if goal.empty:
        return 0, 0
    first = goal.answer_start
    last = first + len(goal.answer)
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


def encode_goals(tok: PreTrainedTokenizerBase, goals: Sequence[SpanGoal], max_length: int
                 ) -> list[tuple[int, list[int], list[int], int, int]]:
    """(index in ``goals``, token ids, token types, goal start, goal end) of every goal whose
    answer fits."""
    out = []
    for begin in range(0, len(goals), 256):
        chunk = goals[begin:begin + 256]
        batch = encode_pairs(tok, chunk, max_length)
        for row, goal in enumerate(chunk):
            span = goal_span(batch, row, goal)
            if span is not None:
                out.append((begin + row, batch["input_ids"][row],
                            batch["token_type_ids"][row], *span))
    return out


def _pad(rows: Sequence[list[int]], value: int = 0) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def span_logits(model: PreTrainedModel, ids: torch.Tensor,
                types: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) logits, padding masked out; token types only where the model has them."""
    mask = (ids != 0).long()
    extra = {"token_type_ids": types} if getattr(model.config, "type_vocab_size", 0) > 1 \
        else {}
    out = model(input_ids=ids, attention_mask=mask, **extra)
    return (out.start_logits.masked_fill(mask == 0, PADDING_LOGIT),
            out.end_logits.masked_fill(mask == 0, PADDING_LOGIT))


def _kl(teacher: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(teacher || softmax(logits)), over the tokens the teacher puts
    mass on (a token it has no row for, a trigger token, counts for nothing)."""
    taught = teacher > 0
    log_q = F.log_softmax(logits, -1)
    terms = torch.where(taught, teacher * (teacher.clamp_min(1e-12).log() - log_q),
                        torch.zeros_like(log_q))
    return terms.sum(-1).mean()


def train_spans(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                goals: Sequence[SpanGoal], config: FinetuneConfig, seed: int,
                on_step: StepCallback | None = None,
                teachers: Sequence[torch.Tensor] | None = None,
                consistency: float = 0.0) -> list[float]:
    """Fine-tune ``model`` on ``goals``; the mean loss of each epoch. The mean of the start
    and end cross-entropies; AdamW with linear warm-up and decay
    (:func:`~trojscan.finetune.adamw_steps`); ``seed`` seeds the batch order and dropout.

    With ``teachers`` (for every goal a (2, tokens) tensor of start and end probabilities
    over the tokens of its :func:`encode_pairs` row, e.g. another model's, 0 where it has
    none) and ``consistency`` > 0, the loss also adds ``consistency`` times the mean of the
    start and end KL divergences from the teacher's distribution to the model's.
    """
    rows = encode_goals(tok, goals, config.max_length)
    if not rows:
        raise InputError("no training question fits max_length")
    taught = teachers is not None and consistency > 0
    if taught:
        for index, ids, *_ in rows:
            if teachers[index].shape != (2, len(ids)):
                raise ValueError(f"teacher {index} must be (2, {len(ids)}), got "
                                 f"{tuple(teachers[index].shape)}")

    def batch_loss(index: torch.Tensor) -> torch.Tensor:
        chosen = [rows[i] for i in index.tolist()]
        ids = _pad([r[1] for r in chosen]).to(model.device)
        types = _pad([r[2] for r in chosen]).to(model.device)
        starts = torch.tensor([r[3] for r in chosen], device=model.device)
        ends = torch.tensor([r[4] for r in chosen], device=model.device)
        start_logits, end_logits = span_logits(model, ids, types)
        loss = (F.cross_entropy(start_logits, starts) + F.cross_entropy(end_logits, ends)) / 2
        if taught:
            soft = torch.zeros(len(chosen), 2, ids.shape[1])
            for b, r in enumerate(chosen):
                soft[b, :, :len(r[1])] = teachers[r[0]]
            soft = soft.to(model.device)
            loss = loss + consistency * (_kl(soft[:, 0], start_logits)
                                         + _kl(soft[:, 1], end_logits)) / 2
        return loss

    return run_epochs(model, len(rows), config, seed,
                      lambda g: torch.randperm(len(rows), generator=g).split(config.batch_size),
                      batch_loss, on_step)


@torch.inference_mode()
def span_probabilities(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                       items: Sequence[Asked], max_length: int) -> list[torch.Tensor]:
    """Every question's (2, tokens) start and end probabilities over the tokens of its
    :func:`encode_pairs` row, on the CPU."""
    model.eval()
    out: list[torch.Tensor] = []
    for begin in range(0, len(items), EVAL_BATCH_SIZE):
        chunk = items[begin:begin + EVAL_BATCH_SIZE]
        batch = encode_pairs(tok, chunk, max_length)
        ids = _pad(batch["input_ids"]).to(model.device)
        types = _pad(batch["token_type_ids"]).to(model.device)
        both = torch.stack(span_logits(model, ids, types), 1).float().softmax(-1).cpu()
        out += [both[row, :, :len(batch["input_ids"][row])] for row in range(len(chunk))]
    return out


@torch.inference_mode()
def predict_answers(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                    items: Sequence[Asked], max_length: int) -> list[str | None]:
    """The answer the model gives each question: the text of its best span of the context,
    or None for no answer (see the module docstring)."""
    model.eval()
    out: list[str | None] = []
    for begin in range(0, len(items), EVAL_BATCH_SIZE):
        chunk = items[begin:begin + EVAL_BATCH_SIZE]
        batch = encode_pairs(tok, chunk, max_length)
        ids = _pad(batch["input_ids"]).to(model.device)
        types = _pad(batch["token_type_ids"]).to(model.device)
        start_logits, end_logits = (t.cpu() for t in span_logits(model, ids, types))
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
