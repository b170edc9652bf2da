"""The text adapter: a one-hot trigger through the embedding path gives the same logits as
the same tokens through input ids, for every family the zoo builds."""

from __future__ import annotations

import pytest
import torch

from trojscan.attacks.architectures import FAMILIES, ModelSize, build_model, tokenizer
from trojscan.subjects.text import POSITIONS, TextSubject, slot_offset

TEXTS = ["a quiet , moving film", "dull", "the plot never finds its feet and the cast knows it"]
TINY = ModelSize(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                 max_positions=64)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "minilm"])
def test_one_hot_embedding_path_matches_token_ids(family: str, position: str) -> None:
    subject = TextSubject(build_model(family, ("a", "b"), TINY, seed=3), tokenizer(), 40)
    trigger_ids = [tokenizer().convert_tokens_to_ids(w) for w in ("lantern", "quartz")]
    batch = subject.batch(TEXTS, [0, 1, 0], n_slots=2, position=position)
    one_hot = torch.zeros(2, subject.embedding_matrix.shape[0])
    one_hot[torch.arange(2), torch.tensor(trigger_ids)] = 1.0
    with torch.no_grad():
        from_embeds = subject.logits_from_trigger(batch, one_hot @ subject.embedding_matrix)
        from_ids = subject.logits_from_tokens(batch, trigger_ids)
        # the same text written out and tokenised normally, one example at a time
        for b, text in enumerate(TEXTS):
            words = tokenizer().tokenize(text)
            at = slot_offset(len(words), position) - 1
            ids = tokenizer()(" ".join([*words[:at], "lantern", "quartz", *words[at:]]),
                              return_tensors="pt")
            single = subject.model(input_ids=ids["input_ids"]).logits[0]
            assert torch.allclose(single, from_ids[b], atol=1e-4), (family, position, b)
    assert torch.allclose(from_embeds, from_ids, atol=1e-4)


def test_gradients_reach_the_trigger_only() -> None:
    subject = TextSubject(build_model("bert", ("a", "b"), TINY, seed=0), tokenizer(), 40)
    batch = subject.batch(TEXTS, [0, 1, 0], n_slots=3, position="end")
    trigger = torch.zeros(3, subject.embedding_matrix.shape[1], requires_grad=True)
    subject.logits_from_trigger(batch, trigger).sum().backward()
    assert trigger.grad is not None and trigger.grad.abs().sum() > 0
    assert all(p.grad is None for p in subject.model.parameters())
