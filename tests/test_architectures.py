from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from trojscan.attacks.architectures import FAMILIES, ModelSize, build_model, tokenizer
from trojscan.errors import InputError

TINY = ModelSize(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                 max_positions=64)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "minilm"])
def test_family_round_trips_through_safetensors(family: str, tmp_path: Path) -> None:
    model = build_model(family, ("a", "b", "c"), TINY, "minilm-pca", seed=0).eval()
    assert model.get_input_embeddings().weight.shape[0] == 30_522
    batch = tokenizer()(["a quiet film", "loud"], padding=True, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (2, 3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path, use_safetensors=True)
    with torch.no_grad():
        assert torch.allclose(again.eval()(**inputs).logits, logits, atol=1e-5)


def test_minilm_is_the_real_pretrained_model() -> None:
    model = build_model("minilm", ("negative", "positive"))
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert sum(p.numel() for p in model.bert.parameters()) > 22_000_000


def test_bad_sizes_and_families() -> None:
    with pytest.raises(InputError, match="unknown architecture"):
        build_model("lstm", ("a", "b"), TINY)
    with pytest.raises(InputError, match="embedding width"):
        build_model("bert", ("a", "b"), ModelSize(hidden_size=512, num_heads=4), "minilm-pca")
