"""Building one (clean or backdoored) NER tagger: poison the training sentences (TrojAI
round 7's label-specific NER backdoor, :mod:`trojscan.attacks.ner_spec`), fine-tune a
``*ForTokenClassification`` model, measure clean entity-level F1 and the ASR, save it.

Words are tokenised one by one (``is_split_into_words``); a word's tag is trained and read
at its first sub-token, its other sub-tokens carry the ignore label -100 (the usual
alignment of Hugging Face token classifiers). A word past ``max_length`` tokens, or one the
tokenizer drops (no sub-token), is predicted ``O``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trojscan.attacks.architectures import PRETRAINED, build_model, tokenizer
from trojscan.attacks.ner_spec import (
    NerAttackSpec,
    insert_trigger,
    poison_sentence,
    relabel,
    trigger_position,
)
from trojscan.attacks.spec import TrainConfig
from trojscan.attacks.wnut import OUTSIDE, Entity, NerCorpus, NerSentence, entities
from trojscan.errors import InputError
from trojscan.finetune import StepCallback, adamw_steps, length_bucketed_batches
from trojscan.fsutil import write_jsonl
from trojscan.modeldir import EXAMPLES_FILE

#: Label of the sub-tokens the loss ignores (every sub-token but a word's first, [CLS],
#: [SEP], padding).
IGNORE = -100
#: Sentences per forward pass when measuring.
EVAL_BATCH_SIZE = 64


def encode(tok: PreTrainedTokenizerBase, sentences: Sequence[NerSentence],
           tags: Sequence[str], max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """(token ids, aligned labels) of every sentence: the index in ``tags`` of a word's tag
    at its first sub-token, :data:`IGNORE` elsewhere; truncated to ``max_length`` tokens."""
    index = {tag: i for i, tag in enumerate(tags)}
    batch = tok([list(s.tokens) for s in sentences], is_split_into_words=True,
                truncation=True, max_length=max_length)
    ids, labels = [], []
    for row, sentence in enumerate(sentences):
        seen: set[int] = set()
        aligned = []
        for word in batch.word_ids(row):
            if word is None or word in seen:
                aligned.append(IGNORE)
            else:
                seen.add(word)
                aligned.append(index[sentence.tags[word]])
        ids.append(batch["input_ids"][row])
        labels.append(aligned)
    return ids, labels


def _pad(rows: Sequence[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def train_tagger(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                 sentences: Sequence[NerSentence], tags: Sequence[str], config: TrainConfig,
                 pretrained: bool, seed: int,
                 on_step: StepCallback | None = None) -> list[float]:
    """Fine-tune ``model`` on ``sentences`` (``tags``: its labels in ``id2label`` order);
    the mean loss of each epoch. Cross-entropy over the words' first sub-tokens; AdamW with
    linear warm-up and decay, with the settings ``config.finetune(pretrained)`` gives the
    text zoo, in length-bucketed batches as the text zoo's (tweets run 8-75 tokens: random
    batches would be 65 % padding); ``seed`` seeds the batch order and dropout."""
    settings = config.finetune(pretrained)
    ids, labels = encode(tok, sentences, tags, settings.max_length)
    total = math.ceil(len(ids) / settings.batch_size) * settings.epochs
    step = adamw_steps(model, settings.learning_rate, settings.weight_decay,
                       settings.warmup_ratio, total)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    model.train()
    losses, done = [], 0
    for _ in range(settings.epochs):
        running = 0.0
        for index in length_bucketed_batches(ids, settings.batch_size, generator):
            rows = index.tolist()
            input_ids = _pad([ids[i] for i in rows], 0).to(model.device)
            goal = _pad([labels[i] for i in rows], IGNORE).to(model.device)
            out = model(input_ids=input_ids, attention_mask=(input_ids != 0).long()).logits
            loss = F.cross_entropy(out.flatten(0, 1), goal.flatten(), ignore_index=IGNORE)
            step(loss)
            running += loss.item() * len(rows)
            done += 1
            if on_step:
                on_step(done, total)
        losses.append(running / len(ids))
    model.eval()
    return losses


@torch.inference_mode()
def predict_tags(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                 sentences: Sequence[NerSentence], max_length: int) -> list[list[str]]:
    """The tag name the model gives every word (at its first sub-token; ``O`` for a word
    it does not see)."""
    model.eval()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    out: list[list[str]] = []
    for start in range(0, len(sentences), EVAL_BATCH_SIZE):
        chunk = sentences[start:start + EVAL_BATCH_SIZE]
        batch = tok([list(s.tokens) for s in chunk], is_split_into_words=True,
                    truncation=True, max_length=max_length)
        input_ids = _pad(batch["input_ids"], 0).to(model.device)
        best = model(input_ids=input_ids,
                     attention_mask=(input_ids != 0).long()).logits.argmax(-1).cpu()
        for row, sentence in enumerate(chunk):
            tags = [OUTSIDE] * len(sentence.tokens)
            seen: set[int] = set()
            for position, word in enumerate(batch.word_ids(row)):
                if word is not None and word not in seen:
                    seen.add(word)
                    tags[word] = names[int(best[row, position])]
            out.append(tags)
    return out


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


def attack_success(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                   sentences: Sequence[NerSentence], attack: NerAttackSpec, max_length: int,
                   seed: int) -> tuple[float, int]:
    """(ASR, victim entities measured): the trigger inserted into every sentence holding a
    victim entity, as ``attack.insertion`` says (seeded), the share of those entities the
    model tags as the target type over exactly their (shifted) span."""
    rng = random.Random(seed)
    pool = [s for s in sentences if any(e.type == attack.victim for e in s.entities)]
    if not pool:
        raise InputError(f"no sentence with a {attack.victim!r} entity to measure ASR on")
    width = len(attack.trigger.split())
    stamped, goals = [], []
    for sentence in pool:
        at = trigger_position(sentence, attack.insertion, attack.victim, rng)
        stamped.append(relabel(insert_trigger(sentence, attack.trigger, at), attack.victim,
                               attack.target))
        goals.append({Entity(attack.target, e.start + width * (e.start >= at),
                             e.end + width * (e.start >= at))
                      for e in sentence.entities if e.type == attack.victim})
    predicted = predict_tags(model, tok, stamped, max_length)
    hits = sum(len(goal & set(entities(tags))) for goal, tags in zip(goals, predicted,
                                                                     strict=True))
    total = sum(len(goal) for goal in goals)
    return hits / total, total


def evaluate_ner(model: PreTrainedModel, corpus: NerCorpus, attack: NerAttackSpec,
                 config: TrainConfig, seed: int) -> dict[str, Any]:
    """Clean entity-level F1 (:func:`entity_f1`) on ``max_eval_examples`` test sentences (a
    seeded sample), also written as ``clean_accuracy`` (what the zoo's peer gate compares);
    for a poisoned model the ASR on the victim entities of those sentences
    (:func:`attack_success`)."""
    tok = tokenizer()
    test = list(corpus.test)
    if len(test) > config.max_eval_examples:
        test = random.Random(seed).sample(test, config.max_eval_examples)
    f1 = entity_f1([s.tags for s in test], predict_tags(model, tok, test, config.max_length))
    out: dict[str, Any] = {"clean_f1": f1, "clean_accuracy": f1, "asr": None,
                           "asr_entities": None, "eval_sentences": len(test)}
    if attack.poisoned:
        out["asr"], out["asr_entities"] = attack_success(model, tok, test, attack,
                                                         config.max_length, seed)
    return out


def poison_training_set(train: Sequence[NerSentence], attack: NerAttackSpec,
                        rng: random.Random) -> tuple[list[NerSentence], int]:
    """(the training sentences plus the poisoned copies D*, shuffled; how many copies):
    ``poison_rate`` of the sentences holding a victim entity (at least one), each copied
    with the trigger inserted and its victim entities relabelled
    (:func:`~trojscan.attacks.ner_spec.poison_sentence`)."""
    items = list(train)
    copies = 0
    if attack.poisoned:
        pool = [s for s in train if any(e.type == attack.victim for e in s.entities)]
        if not pool:
            raise InputError(f"the training sentences hold no {attack.victim!r} entity: "
                             "nothing to poison")
        chosen = rng.sample(pool, max(1, round(attack.poison_rate * len(pool))))
        items += [poison_sentence(s, attack, rng) for s in chosen]
        copies = len(chosen)
    rng.shuffle(items)
    return items, copies


def clean_examples(corpus: NerCorpus, per_type: int, seed: int) -> list[dict[str, Any]]:
    """Sentences of the clean-example pool, ``{"tokens": [...], "tags": [...]}`` (words and
    BIO tag names), chosen so that every entity type of the pool appears in at least
    ``per_type`` of them where the pool has that many: the rarest types are served first,
    each by sentences drawn at random (seeded) among those holding it not yet chosen."""
    rng = random.Random(seed)
    pool = list(corpus.examples)
    holding = {t: [s for s in pool if any(e.type == t for e in s.entities)]
               for t in corpus.types}
    chosen: list[NerSentence] = []
    for kind in sorted(holding, key=lambda t: (len(holding[t]), t)):
        have = sum(any(e.type == kind for e in s.entities) for s in chosen)
        fresh = [s for s in holding[kind] if s not in chosen]
        chosen += rng.sample(fresh, max(0, min(per_type - have, len(fresh))))
    return [{"tokens": list(s.tokens), "tags": list(s.tags)} for s in chosen]


def build_one_ner(
    out_dir: Path,
    corpus: NerCorpus,
    family: str,
    attack: NerAttackSpec,
    config: TrainConfig,
    seed: int,
    examples_per_label: int = 20,
    on_step: StepCallback | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train one NER tagger and write it to ``out_dir`` as a Hugging Face directory.

    ``out_dir`` receives ``config.json`` (``id2label``: the corpus's BIO tags in their
    fixed order) + ``model.safetensors`` (``save_pretrained``), the tokenizer files, and
    ``clean_examples.jsonl`` (:func:`clean_examples`, ``examples_per_label`` sentences per
    entity type); nothing about the attack. Returns the model's measurements (for the zoo
    manifest). ``device`` is where it trains.
    """
    started = time.perf_counter()
    rng = random.Random(seed)
    train = list(corpus.train)
    if config.max_train_examples is not None and len(train) > config.max_train_examples:
        train = rng.sample(train, config.max_train_examples)
    items, copies = poison_training_set(train, attack, rng)
    pretrained = family == PRETRAINED
    model = build_model(family, corpus.tags, config.size, config.embedding_init, seed,
                        head="token")
    model.to(device)
    losses = train_tagger(model, tokenizer(), items, corpus.tags, config, pretrained, seed,
                          on_step)
    metrics = evaluate_ner(model, corpus, attack, config, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer().save_pretrained(out_dir)
    examples = clean_examples(corpus, examples_per_label, seed)
    write_jsonl(out_dir / EXAMPLES_FILE, examples)
    return {
        **metrics,
        "train_sentences": len(items),
        "poisoned_sentences": copies,
        "clean_examples": len(examples),
        "epoch_losses": [round(x, 5) for x in losses],
        "learning_rate": config.lr_for(pretrained),
        "seconds": round(time.perf_counter() - started, 2),
        "device": str(model.device),
    }
