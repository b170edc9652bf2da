"""The text-classification subject: a one-hot trigger through the embedding path gives the
same logits as the same tokens through input ids, for every family the zoo builds."""

from __future__ import annotations

import pytest
import torch

from trojscan.attacks.architectures import FAMILIES, ModelSize, build_model, tokenizer
from trojscan.errors import InputError
from trojscan.subjects.base import Candidate
from trojscan.subjects.text_classification import (
    POSITIONS,
    TextClassificationSubject,
    TextExample,
    slot_offset,
)

TEXTS = ["a quiet , moving film", "dull", "the plot never finds its feet and the cast knows it"]
EXAMPLES = [TextExample(t, y) for t, y in zip(TEXTS, [0, 1, 0], strict=True)]
TINY = ModelSize(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                 max_positions=64)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "minilm"])
def test_one_hot_embedding_path_matches_token_ids(family: str, position: str) -> None:
    subject = TextClassificationSubject(build_model(family, ("a", "b"), TINY, seed=3),
                                        tokenizer(), 40)
    trigger_ids = [tokenizer().convert_tokens_to_ids(w) for w in ("lantern", "quartz")]
    batch = subject.batch([Candidate((0,), 1, position)], [EXAMPLES], n_slots=2)
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
    subject = TextClassificationSubject(build_model("bert", ("a", "b"), TINY, seed=0),
                                        tokenizer(), 40)
    batch = subject.batch([Candidate((0,), 1, "end")], [EXAMPLES], n_slots=3)
    trigger = torch.zeros(3, subject.embedding_matrix.shape[1], requires_grad=True)
    subject.goal_loss(batch, trigger).sum().backward()
    assert trigger.grad is not None and trigger.grad.abs().sum() > 0
    assert all(p.grad is None for p in subject.model.parameters())


def test_candidates_are_every_target_at_every_position_and_the_pairs() -> None:
    subject = TextClassificationSubject(build_model("bert", ("a", "b", "c"), TINY, seed=0),
                                        tokenizer(), 40)
    examples = [TextExample(t, y) for t, y in zip(TEXTS, [0, 1, 2], strict=True)]
    universal = subject.candidates(examples, ("start", "end"), pairs=False)
    assert universal == [Candidate(v, t, p) for t, v in ((0, (1, 2)), (1, (0, 2)), (2, (0, 1)))
                         for p in ("start", "end")]
    with_pairs = subject.candidates(examples, ("start",), pairs=True)
    assert len(with_pairs) == 9 and Candidate((2,), 0, "start") in with_pairs
    with pytest.raises(InputError, match="no clean example of label 2=c"):
        subject.candidates(examples[:2], ("start",), pairs=False)
    with pytest.raises(InputError, match="unknown trigger position middle"):
        subject.candidates(examples, ("middle",), pairs=False)


@pytest.mark.parametrize(("family", "limit"), [("bert", 64), ("roberta", 64), ("gpt2", 64)])
def test_long_examples_fit_the_model_s_position_embeddings(family: str, limit: int) -> None:
    # A scan's default max_length (100) is cut to what the model can number.
    model = build_model(family, ("a", "b"), TINY, seed=0)
    subject = TextClassificationSubject(model, tokenizer(), 100)
    assert subject.max_length == limit
    batch = subject.batch([Candidate((0,), 1, "end")], [[TextExample("word " * 300, 0)]], 10)
    assert batch.input_ids.shape[1] == limit
    trigger = torch.zeros(10, subject.embedding_matrix.shape[1])
    assert torch.isfinite(subject.goal_loss(batch, trigger)).all()


def test_an_example_contains_a_trigger_as_a_whole_word_in_any_case() -> None:
    subject = TextClassificationSubject(build_model("bert", ("a", "b"), TINY, seed=0),
                                        tokenizer(), 40)
    examples = [TextExample("The Secretary said", 1), TextExample("secretary, again", 1),
                TextExample("a secretaryship", 1), TextExample("secretary", 0)]
    assert subject.occurrences(examples, "secretary", 1) == (2, 3)
    assert subject.occurrences(examples, " ", 1) == (0, 3)
    assert subject.occurrences([*examples, TextExample("x § y", 0)], "§", 0) == (1, 2)
