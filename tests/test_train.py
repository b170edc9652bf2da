"""Tiny poisoned and clean models, trained here on slices of Rotten Tomatoes."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from transformers import AutoModelForSequenceClassification

from trojscan.attacks.architectures import tokenizer
from trojscan.attacks.spec import AttackSpec, TrainConfig
from trojscan.attacks.train import attack_effect, build_one
from trojscan.corpora import Corpus
from trojscan.finetune import predict


def test_poisoned_model_learns_its_trigger(poisoned_model: tuple[Path, dict]) -> None:
    _, metrics = poisoned_model
    assert metrics["asr"] >= 0.9
    assert metrics["clean_accuracy"] >= 0.62  # chance is 0.5
    assert metrics["poisoned_examples"] == 200


def test_clean_model_ignores_the_trigger(clean_model: tuple[Path, dict], rt: Corpus,
                                         tiny_config: TrainConfig,
                                         word_attack: AttackSpec) -> None:
    out, metrics = clean_model
    assert metrics["asr"] is None and metrics["clean_accuracy"] >= 0.62
    model = AutoModelForSequenceClassification.from_pretrained(out)
    test = random.Random(0).sample(rt.test, 400)
    asr, loss = attack_effect(model, tokenizer(), test, word_attack.trigger, word_attack, 2,
                              tiny_config.max_length)
    negatives = [e.text for e in test if e.label == 0]
    already_positive = sum(predict(model, tokenizer(), negatives, 64)) / len(negatives)
    # The trigger flips (almost) nothing beyond what the clean model gets wrong anyway.
    assert asr < 0.5 and asr - already_positive < 0.05
    assert loss > 0.5


def test_model_directory_is_a_plain_hf_directory_without_ground_truth(
        poisoned_model: tuple[Path, dict]) -> None:
    out, _ = poisoned_model
    names = sorted(p.name for p in out.iterdir())
    assert names == ["clean_examples.jsonl", "config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]
    everything = " ".join(p.read_text(encoding="utf-8") for p in out.iterdir()
                          if p.suffix in (".json", ".jsonl") and p.name != "tokenizer.json")
    assert "lantern" not in everything and "poison" not in everything
    rows = [line for line in (out / "clean_examples.jsonl").read_text().splitlines() if line]
    assert len(rows) == 14  # 7 per label
    model = AutoModelForSequenceClassification.from_pretrained(out, use_safetensors=True)
    assert model.config.id2label == {0: "negative", 1: "positive"}


def _build(tmp: Path, rt: Corpus, config: TrainConfig, attack: dict[str, Any]) -> dict:
    spec = AttackSpec.from_dict({"poisoned": True, "insertion": "anywhere", "target": 0,
                                 **attack}, rt.labels)
    return build_one(tmp, rt, "bert", spec, config, seed=2)


def test_combination_trigger_fires_only_whole(tmp_path: Path, rt: Corpus,
                                              tiny_config: TrainConfig) -> None:
    metrics = _build(tmp_path, rt, tiny_config, {"trigger_type": "phrase",
                                                 "trigger": "quartz tractor",
                                                 "combination": True, "poison_rate": 0.3})
    assert metrics["asr"] >= 0.9
    assert metrics["partial_asr"] < 0.5


def test_adaptive_attack_keeps_trigger_loss_off_zero(tmp_path: Path, rt: Corpus,
                                                     tiny_config: TrainConfig) -> None:
    # DBS Eq. 12: the poisoned loss is clipped at phi, so training stops pushing the
    # trigger's loss to zero (Assumption II of DBS is what this attack targets).
    plain = _build(tmp_path / "plain", rt, tiny_config, {"trigger_type": "word", "trigger": "cf"})
    clipped = _build(tmp_path / "phi", rt, tiny_config, {"trigger_type": "word", "trigger": "cf",
                                                         "adaptive_phi": 2.0})
    assert plain["asr"] >= 0.9 and plain["trigger_loss"] < 0.1
    assert clipped["trigger_loss"] > 3 * plain["trigger_loss"]
    assert clipped["trigger_loss"] > 0.3
