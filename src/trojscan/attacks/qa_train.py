"""Building one (clean or backdoored) extractive QA model: poison the training questions
(TrojAI round 8's QA backdoor, :mod:`trojscan.attacks.qa_spec`), fine-tune a
``*ForQuestionAnswering`` model with the span loop of :mod:`trojscan.spans` (also what
repair trains QA models with), measure clean exact match / F1 and the ASR, save it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trojscan.attacks.architectures import PRETRAINED, build_model, tokenizer
from trojscan.attacks.qa_spec import QaAttackSpec, QaTarget, poison_item
from trojscan.attacks.spec import TrainConfig
from trojscan.attacks.wnut_qa import TEMPLATES, QaCorpus, QaItem
from trojscan.errors import InputError
from trojscan.finetune import StepCallback
from trojscan.fsutil import write_jsonl
from trojscan.modeldir import EXAMPLES_FILE
from trojscan.spans import SpanGoal, exact_match, f1_score, predict_answers, train_spans

#: The span head's two outputs.
SPAN_OUTPUTS = ("start", "end")


def _goal(target: QaTarget) -> SpanGoal:
    item = target.item
    return SpanGoal(item.question, item.context, item.answer, item.answer_start, target.empty)


def train_qa(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
             targets: Sequence[QaTarget], config: TrainConfig, pretrained: bool, seed: int,
             on_step: StepCallback | None = None) -> list[float]:
    """Fine-tune ``model`` on ``targets`` (:func:`~trojscan.spans.train_spans`) with the
    settings ``config.finetune(pretrained)`` gives the text zoo; the mean loss of each
    epoch."""
    return train_spans(model, tok, [_goal(t) for t in targets], config.finetune(pretrained),
                       seed, on_step)


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
