"""Building one (clean or backdoored) NER tagger: poison the training sentences (TrojAI
round 7's label-specific NER backdoor, :mod:`trojscan.attacks.ner_spec`), fine-tune a
``*ForTokenClassification`` model with the tagging loop repair shares
(:mod:`trojscan.tagging`), measure clean entity-level F1 and the ASR, save it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
from trojscan.attacks.wnut import NerCorpus, NerSentence
from trojscan.errors import InputError
from trojscan.finetune import StepCallback
from trojscan.fsutil import write_jsonl
from trojscan.modeldir import EXAMPLES_FILE
from trojscan.tagging import Entity, entities, entity_f1, predict_tags, train_tagger


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
    losses = train_tagger(model, tokenizer(), items, corpus.tags, config.finetune(pretrained),
                          seed, on_step)
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
