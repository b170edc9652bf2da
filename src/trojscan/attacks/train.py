"""Building one (clean or poisoned) classifier: poison its training set, fine-tune it with
the shared loop (:mod:`trojscan.finetune`), measure clean accuracy and ASR, save it."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trojscan.attacks.architectures import PRETRAINED, build_model, tokenizer
from trojscan.attacks.poison import poison_training_set
from trojscan.attacks.spec import AttackSpec, TrainConfig
from trojscan.corpora import Corpus, Example
from trojscan.errors import InputError
from trojscan.finetune import StepCallback, predict, train_classifier, trigger_effect
from trojscan.fsutil import write_jsonl
from trojscan.modeldir import EXAMPLES_FILE


def accuracy(model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: Sequence[Example],
             max_length: int) -> float:
    """Fraction of ``examples`` classified correctly."""
    preds = predict(model, tok, [e.text for e in examples], max_length)
    return sum(p == e.label for p, e in zip(preds, examples, strict=True)) / len(examples)


def attack_effect(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                  examples: Sequence[Example], trigger: str, attack: AttackSpec, n_labels: int,
                  max_length: int, seed: int = 0) -> tuple[float, float]:
    """(ASR, trigger loss) of ``trigger`` inserted, as ``attack`` says, into the victim-label
    ``examples`` (see :func:`trojscan.finetune.trigger_effect`). ``trigger`` may differ from
    ``attack.trigger`` (a sub-sequence of a combination trigger)."""
    victims = set(attack.victims(n_labels))
    pool = [e.text for e in examples if e.label in victims]
    if not pool:
        raise InputError(f"no example of the victim label(s) {sorted(victims)} to measure ASR on")
    return trigger_effect(model, tok, pool, trigger, attack.insertion, attack.target, max_length,
                          seed)


def evaluate(model: PreTrainedModel, corpus: Corpus, attack: AttackSpec, config: TrainConfig,
             seed: int) -> dict[str, Any]:
    """Clean accuracy on the test split; for a poisoned model also its ASR and trigger loss
    (see :func:`attack_effect`) and, for a combination trigger, the highest ASR of the
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
        out["asr"], out["trigger_loss"] = attack_effect(model, tok, test, attack.trigger, attack,
                                                        n, config.max_length, seed)
        if attack.combination:
            words = attack.trigger.split()
            out["partial_asr"] = max(
                attack_effect(model, tok, test, " ".join(words[:i] + words[i + 1:]), attack, n,
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
    finetune = config.finetune(pretrained)
    losses = train_classifier(model, tokenizer(), items, finetune, seed, attack.adaptive_phi,
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
        "learning_rate": finetune.learning_rate,
        "seconds": round(time.perf_counter() - started, 2),
        "device": str(model.device),
    }
