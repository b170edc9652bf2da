"""The extractive-QA subject on a tiny randomly initialised span model: where the slots,
token types and goal spans go, that the embedding path equals the token path, the
candidates, and the errors a bad examples file gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from trojscan.attacks.architectures import tokenizer
from trojscan.campaign.report import target_positions
from trojscan.errors import InputError
from trojscan.scan import trigger_check
from trojscan.subjects.base import SPREAD, Candidate
from trojscan.subjects.extractive_qa import (
    ANSWER,
    EMPTY,
    TRIGGER,
    ExtractiveQaSubject,
    QaExample,
)

EXAMPLES = [
    QaExample("who founded the firm ?", "the firm was founded by ada lovelace in london .", True),
    QaExample("where is it ?", "it is in paris , near the river .", True),
    QaExample("what is unknown ?", "nothing here answers it .", False),
]


def span_model() -> ExtractiveQaSubject:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30_522, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    return ExtractiveQaSubject(BertForQuestionAnswering(config), tokenizer(), 48)


@pytest.mark.parametrize("position", ["question", "context", "both"])
def test_slots_types_and_goal_spans(position: str) -> None:
    subject = span_model()
    targets = [EMPTY] + ([TRIGGER] if position != "question" else [])
    for target in targets:
        batch = subject.batch([Candidate((ANSWER,), target, position)], [EXAMPLES[:1]], 2)
        ids, types = batch.input_ids[0].tolist(), batch.token_type_ids[0].tolist()
        slots = batch.slot_index[0].tolist()
        seps = [k for k, i in enumerate(ids) if i == tokenizer().sep_token_id]
        question_slots = [k for k in range(seps[0]) if slots[k] >= 0]
        context_slots = [k for k in range(seps[0], len(ids)) if slots[k] >= 0]
        assert (question_slots == [1, 2]) == (position in ("question", "both"))
        assert (context_slots == [seps[0] + 1, seps[0] + 2]) == (position in ("context",
                                                                              "both"))
        assert all(t == 0 for t in types[: seps[0] + 1]) and all(t == 1 for t in
                                                                 types[seps[0] + 1:])
        goal = (batch.starts.item(), batch.ends.item())
        assert goal == ((0, 0) if target == EMPTY else (context_slots[0], context_slots[-1]))


def test_embedding_path_matches_token_ids_with_the_trigger_twice() -> None:
    subject = span_model()
    batch = subject.batch([Candidate((ANSWER,), TRIGGER, "both")], [EXAMPLES[:2]], 2)
    ids = subject.token_ids("lantern quartz")
    one_hot = torch.zeros(2, subject.embedding_matrix.shape[0])
    one_hot[torch.arange(2), torch.tensor(ids)] = 1.0
    with torch.no_grad():
        relaxed = subject.goal_loss(batch, one_hot @ subject.embedding_matrix)
        loss, hit = subject.hard_check(batch, torch.tensor(ids))
        logits = subject.logits_from_tokens(batch, ids)
    assert torch.allclose(relaxed, loss, atol=1e-4)
    best = logits.argmax(1)
    context_slots = (batch.slot_index >= 0) & (batch.token_type_ids == 1)
    expected = (context_slots.gather(1, best).all(1) & (best[:, 0] <= best[:, 1])).float()
    assert torch.equal(hit, expected)


def test_a_trigger_answer_may_be_any_part_of_the_trigger() -> None:
    # A planted word may sit anywhere among the inverted trigger's slots, and the model
    # answers with it alone: any span of the context slots is the trigger answer, a span on
    # the question's copy of the trigger or on the context's own words is not.
    subject = span_model()
    batch = subject.batch([Candidate((ANSWER,), TRIGGER, "both")], [EXAMPLES[:1]], 3)
    width = batch.input_ids.shape[1]
    in_context = (batch.slot_index[0] >= 0) & (batch.token_type_ids[0] == 1)
    in_question = (batch.slot_index[0] >= 0) & (batch.token_type_ids[0] == 0)
    context, question = in_context.nonzero().flatten(), in_question.nonzero().flatten()

    def answering(start: int, end: int) -> torch.Tensor:
        logits = torch.full((1, width, 2), -20.0)
        logits[0, start, 0] = logits[0, end, 1] = 20.0
        return logits

    def loss(logits: torch.Tensor, goal_batch: object) -> float:
        return subject._span_loss(logits, goal_batch).item()

    assert loss(answering(context[1], context[1]), batch) < 1e-3
    assert loss(answering(context[0], context[2]), batch) < 1e-3
    assert loss(answering(question[0], question[0]), batch) > 10
    assert loss(answering(int(context[-1]) + 1, int(context[-1]) + 1), batch) > 10
    empty = subject.batch([Candidate((ANSWER,), EMPTY, "both")], [EXAMPLES[:1]], 3)
    assert loss(answering(0, 0), empty) < 1e-3
    assert loss(answering(context[1], context[1]), empty) > 10


def test_gradients_reach_the_trigger() -> None:
    subject = span_model()
    batch = subject.batch([Candidate((ANSWER,), EMPTY, "question")], [EXAMPLES[:2]], 3)
    trigger = torch.zeros(3, subject.embedding_matrix.shape[1], requires_grad=True)
    subject.goal_loss(batch, trigger).sum().backward()
    assert trigger.grad is not None and trigger.grad.abs().sum() > 0


def test_candidates_and_spread_positions() -> None:
    subject = span_model()
    cands = subject.candidates(EXAMPLES, ["question", "context", "both"], pairs=True)
    assert {(c.target, c.position) for c in cands} == {
        (EMPTY, "question"), (EMPTY, "context"), (EMPTY, "both"), (TRIGGER, "context"),
        (TRIGGER, "both")}
    assert len(subject.victims(EXAMPLES, cands[0], 0)) == 2  # the answered ones
    spread = Candidate((ANSWER,), TRIGGER, SPREAD)
    assert subject.row_positions(spread, 3) == ["context", "both", "context"]
    assert [c.position for c in subject.concrete(spread)] == ["context", "both"]
    with pytest.raises(InputError, match="no clean example has an answer"):
        subject.candidates(EXAMPLES[2:], ["context"], pairs=False)
    with pytest.raises(InputError, match="unknown trigger position"):
        subject.candidates(EXAMPLES, ["start"], pairs=False)


def test_examples_keep_their_answers_and_mend_a_wrong_offset(tmp_path: Path) -> None:
    """Repair trains towards the answers: each is read with its offset, and an offset that is
    missing or does not point at the text is read as the text's first occurrence."""
    context = "ada met ada in paris ."
    rows = [{"question": "who ?", "context": context,
             "answers": {"text": ["ada", "paris"], "answer_start": [8, 3]}},
            {"question": "who ?", "context": context, "answers": {"text": ["paris"]}},
            {"question": "what ?", "context": context, "answers": {"text": []}}]
    path = tmp_path / "examples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    read = span_model().read_examples(path)
    assert [e.answers for e in read] == [(("ada", 8), ("paris", 15)), (("paris", 15),), ()]
    assert [e.answered for e in read] == [True, True, False]


@pytest.mark.parametrize("row, message", [
    ({"question": "q ?", "context": "c .", "answers": {"text": ["zebra"],
                                                     "answer_start": [0]}}, "not in the context"),
    ({"question": " ", "context": "c .", "answers": {"text": [], "answer_start": []}},
     "empty question"),
    ({"question": "q ?", "context": "c ."}, "SQuAD's form"),
])
def test_bad_examples_are_named(tmp_path: Path, row: dict, message: str) -> None:
    path = tmp_path / "examples.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=message):
        span_model().read_examples(path)


def test_search_gaps_measure_the_true_trigger_where_its_behaviour_can_be() -> None:
    """A campaign report's search gap plants the true trigger only where the family takes a
    candidate of its behaviour: a ``trigger`` answer needs the trigger in the context."""
    subject = span_model()
    assert target_positions(subject, EXAMPLES, TRIGGER) == ["context", "both"]
    assert target_positions(subject, EXAMPLES, EMPTY) == ["question", "context", "both"]
    for position in target_positions(subject, EXAMPLES, TRIGGER):
        loss, asr = trigger_check(subject, EXAMPLES, Candidate((ANSWER,), TRIGGER, position),
                                  "zebra", 0)
        assert loss > 0 and 0 <= asr <= 1
