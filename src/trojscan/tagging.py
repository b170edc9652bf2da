"""Fine-tuning and measuring Hugging Face token classifiers (NER taggers), word by word.

The one tagging loop of trojscan: the zoo builder fine-tunes (poisoned) taggers with it and
repair unlearns an NER backdoor with it, so both train exactly the same way; also what both
measure: each word's logits and tag, entities, entity-level F1.

Words are tokenised one by one (``is_split_into_words``); a word's tag is trained and read
at its first sub-token, its other sub-tokens carry the ignore label -100 (the usual
alignment of Hugging Face token classifiers). A word past ``max_length`` tokens, or one the
tokenizer drops (no sub-token), is not read: predicted ``O``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trojscan.finetune import FinetuneConfig, StepCallback, length_bucketed_batches, run_epochs

#: The tag of words outside every entity.
OUTSIDE = "O"
#: Label of the sub-tokens the loss ignores (every sub-token but a word's first, [CLS],
#: [SEP], padding).
IGNORE = -100
#: Sentences per forward pass when measuring.
EVAL_BATCH_SIZE = 64


class Tagged(Protocol):
    """A sentence as words with one BIO tag name each."""

    @property
    def tokens(self) -> tuple[str, ...]: ...

    @property
    def tags(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class Entity:
    """An entity of a sentence: its type and its words ``start`` to ``end`` (exclusive)."""

    type: str
    start: int
    end: int


def entities(tags: Sequence[str]) -> list[Entity]:
    """The entities of a BIO tag sequence, as CoNLL's evaluation reads them (seqeval's
    default mode): an entity starts at ``B-x``, or at an ``I-x`` that does not continue an
    entity of type ``x``, and runs over the ``I-x`` tags that follow."""
    found: list[Entity] = []
    kind, start = None, 0
    for i, tag in enumerate([*tags, OUTSIDE]):
        prefix, name = (tag[:2], tag[2:]) if tag[:2] in ("B-", "I-") else ("", None)
        if kind is not None and (prefix != "I-" or name != kind):
            found.append(Entity(kind, start, i))
            kind = None
        if name is not None and kind is None:
            kind, start = name, i
    return found


def _words(tok: PreTrainedTokenizerBase, sentences: Sequence[Tagged],
           max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """(token ids, the position of each word's first sub-token or -1 where the model does
    not read it) of every sentence, truncated to ``max_length`` tokens."""
    batch = tok([list(s.tokens) for s in sentences], is_split_into_words=True,
                truncation=True, max_length=max_length)
    ids, firsts = [], []
    for row, sentence in enumerate(sentences):
        first = [-1] * len(sentence.tokens)
        for position, word in enumerate(batch.word_ids(row)):
            if word is not None and first[word] < 0:
                first[word] = position
        ids.append(batch["input_ids"][row])
        firsts.append(first)
    return ids, firsts


def _labels(sentences: Sequence[Tagged], tags: Sequence[str], ids: Sequence[list[int]],
            firsts: Sequence[list[int]]) -> list[list[int]]:
    """The labels aligned with ``ids``: the index in ``tags`` of a word's tag at its first
    sub-token (``firsts``, from :func:`_words`), :data:`IGNORE` elsewhere."""
    index = {tag: i for i, tag in enumerate(tags)}
    labels = []
    for row, (sentence, first) in enumerate(zip(sentences, firsts, strict=True)):
        aligned = [IGNORE] * len(ids[row])
        for word, position in enumerate(first):
            if position >= 0:
                aligned[position] = index[sentence.tags[word]]
        labels.append(aligned)
    return labels


def _pad(rows: Sequence[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def train_tagger(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                 sentences: Sequence[Tagged], tags: Sequence[str], config: FinetuneConfig,
                 seed: int, on_step: StepCallback | None = None,
                 teachers: Sequence[torch.Tensor] | None = None,
                 consistency: float = 0.0) -> list[float]:
    """Fine-tune ``model`` on ``sentences`` (``tags``: its labels in ``id2label`` order);
    the mean loss of each epoch. Cross-entropy over the words' first sub-tokens; AdamW with
    linear warm-up and decay (:func:`~trojscan.finetune.adamw_steps`), in length-bucketed
    batches (tweets run 8-75 tokens: random batches would be 65 % padding); ``seed`` seeds
    the batch order and dropout.

    With ``teachers`` (for every sentence a (words, tags) tensor of logits, e.g. another
    model's, a row of NaN where a word has none) and ``consistency`` > 0, the loss also
    adds ``consistency`` times the mean KL divergence, over the words with a teacher row,
    from the softmax of that row to the model's output at the word.
    """
    ids, firsts = _words(tok, sentences, config.max_length)
    labels = _labels(sentences, tags, ids, firsts)
    goal_soft: list[torch.Tensor] = []
    if teachers is not None and consistency:
        for row, (teacher, first) in enumerate(zip(teachers, firsts, strict=True)):
            if teacher.shape != (len(first), len(tags)):
                raise ValueError(f"teacher {row} must be ({len(first)}, {len(tags)}), got "
                                 f"{tuple(teacher.shape)}")
            aligned = torch.full((len(ids[row]), len(tags)), math.nan)
            for word, position in enumerate(first):
                if position >= 0:
                    aligned[position] = teacher[word].float()
            goal_soft.append(aligned)

    def batch_loss(index: torch.Tensor) -> torch.Tensor:
        rows = index.tolist()
        input_ids = _pad([ids[i] for i in rows], 0).to(model.device)
        goal = _pad([labels[i] for i in rows], IGNORE).to(model.device)
        out = model(input_ids=input_ids, attention_mask=(input_ids != 0).long()).logits
        loss = F.cross_entropy(out.flatten(0, 1), goal.flatten(), ignore_index=IGNORE)
        if goal_soft:
            soft = torch.full((*input_ids.shape, len(tags)), math.nan)
            for b, i in enumerate(rows):
                soft[b, :len(goal_soft[i])] = goal_soft[i]
            soft = soft.to(model.device)
            taught = ~soft.isnan().any(-1)
            if taught.any():
                loss = loss + consistency * F.kl_div(
                    F.log_softmax(out[taught], -1), F.log_softmax(soft[taught], -1),
                    reduction="batchmean", log_target=True)
        return loss

    return run_epochs(model, len(ids), config, seed,
                      lambda g: length_bucketed_batches(ids, config.batch_size, g),
                      batch_loss, on_step)


@torch.inference_mode()
def word_logits(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                sentences: Sequence[Tagged], max_length: int) -> list[torch.Tensor]:
    """Every sentence's (words, tags) logits on the CPU, read at each word's first
    sub-token; a row of NaN for a word the model does not read."""
    model.eval()
    out: list[torch.Tensor] = []
    for start in range(0, len(sentences), EVAL_BATCH_SIZE):
        chunk = sentences[start:start + EVAL_BATCH_SIZE]
        ids, firsts = _words(tok, chunk, max_length)
        input_ids = _pad(ids, 0).to(model.device)
        scores = model(input_ids=input_ids,
                       attention_mask=(input_ids != 0).long()).logits.float().cpu()
        for row, first in enumerate(firsts):
            words = torch.full((len(first), scores.shape[-1]), math.nan)
            for word, position in enumerate(first):
                if position >= 0:
                    words[word] = scores[row, position]
            out.append(words)
    return out


def predict_tags(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                 sentences: Sequence[Tagged], max_length: int) -> list[list[str]]:
    """The tag name the model gives every word (at its first sub-token; ``O`` for a word
    it does not read)."""
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return [[OUTSIDE if row.isnan().any() else names[int(row.argmax())] for row in words]
            for words in word_logits(model, tok, sentences, max_length)]


def entity_f1(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> float:
    """Micro-averaged entity-level F1 (CoNLL / seqeval): a predicted entity is correct only
    when its type, first and last word all match a gold entity; 0 when there is no entity
    on either side."""
    true_positives = n_gold = n_predicted = 0
    for g, p in zip(gold, predicted, strict=True):
        gold_set, predicted_set = set(entities(list(g))), set(entities(list(p)))
        true_positives += len(gold_set & predicted_set)
        n_gold += len(gold_set)
        n_predicted += len(predicted_set)
    if not true_positives:
        return 0.0
    precision, recall = true_positives / n_predicted, true_positives / n_gold
    return 2 * precision * recall / (precision + recall)
