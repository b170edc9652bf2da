"""The token-classification (NER) subject on a tiny randomly initialised tagger: where the
slots and the goals go, that the embedding path equals the token path, the candidates, and
the errors a bad examples file or a tagger without entity tags gets."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertForTokenClassification

from trojscan.attacks.architectures import tokenizer
from trojscan.campaign.report import search_gaps
from trojscan.errors import InputError
from trojscan.modeldir import EXAMPLES_FILE
from trojscan.results import CandidateResult
from trojscan.subjects.base import Candidate
from trojscan.subjects.token_classification import (
    IGNORE,
    NerExample,
    TokenClassificationSubject,
    tag_type,
)

TAGS = ("O", "B-person", "I-person", "B-geo-loc", "I-geo-loc", "B-company", "I-company")
SENTENCES = [
    NerExample(("I", "met", "John", "Smith", "in", "Paris"),
               ("O", "O", "B-person", "I-person", "O", "B-geo-loc")),
    NerExample(("Apple", "hires", "in", "London"), ("B-company", "O", "O", "B-geo-loc")),
    NerExample(("nothing", "here"), ("O", "O")),
]


def tagger(tags: tuple[str, ...] = TAGS, max_positions: int = 64) -> TokenClassificationSubject:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30_522, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=max_positions, num_labels=len(tags),
                        id2label=dict(enumerate(tags)),
                        label2id={t: i for i, t in enumerate(tags)})
    return TokenClassificationSubject(BertForTokenClassification(config), tokenizer(), 40)


def test_labels_are_the_entity_types_and_tags_parse() -> None:
    assert tagger().labels == ("person", "geo-loc", "company")
    assert tag_type("B-geo-loc") == ("B-", "geo-loc")
    assert tag_type("O") == ("", "")
    assert tag_type("person") == ("", "person")  # IO scheme


def test_goals_are_the_victim_words_first_sub_tokens_with_target_tags() -> None:
    subject = tagger()
    person, geo = subject.labels.index("person"), subject.labels.index("geo-loc")
    for position in ("start", "local", "end"):
        batch = subject.batch([Candidate((person,), geo, position)], [SENTENCES[:1]], 2)
        ids, goals = batch.input_ids[0].tolist(), batch.goal_tags[0].tolist()
        slots = [k for k, s in enumerate(batch.slot_index[0].tolist()) if s >= 0]
        words = tokenizer().convert_ids_to_tokens(ids)
        aimed = {words[k]: TAGS[g] for k, g in enumerate(goals) if g != IGNORE}
        # 'John' -> B-geo-loc, 'Smith' -> I-geo-loc; 'Paris' (already geo-loc) is no goal
        assert aimed == {"john": "B-geo-loc", "smith": "I-geo-loc"}, position
        assert len(slots) == 2 and slots == [slots[0], slots[0] + 1]
        expected = {"start": 1, "local": words.index("john") - 2,
                    "end": len(words) - 3}[position]
        assert slots[0] == expected, position


def test_embedding_path_matches_token_ids_and_hits_need_every_victim_word() -> None:
    subject = tagger()
    cand = Candidate((subject.labels.index("person"),), subject.labels.index("company"),
                     "local")
    batch = subject.batch([cand], [SENTENCES[:1]], 2)
    ids = subject.token_ids("lantern quartz")
    one_hot = torch.zeros(2, subject.embedding_matrix.shape[0])
    one_hot[torch.arange(2), torch.tensor(ids)] = 1.0
    with torch.no_grad():
        from_embeds = subject.logits_from_trigger(batch, one_hot @ subject.embedding_matrix)
        from_ids = subject.logits_from_tokens(batch, ids)
        loss, hit = subject.hard_check(batch, torch.tensor(ids))
        relaxed = subject.goal_loss(batch, one_hot @ subject.embedding_matrix)
    assert torch.allclose(from_embeds, from_ids, atol=1e-4)
    assert torch.allclose(loss, relaxed, atol=1e-4)
    aimed = batch.goal_tags != IGNORE
    predicted = from_ids.argmax(-1)
    assert hit.item() == float(bool((predicted[aimed] == batch.goal_tags[aimed]).all()))


def test_long_sentences_keep_a_window_around_their_first_victim() -> None:
    subject = tagger()
    words = tuple(["filler"] * 60 + ["John"])
    tags = tuple(["O"] * 60 + ["B-person"])
    batch = subject.batch([Candidate((0,), 1, "start")], [[NerExample(words, tags)]], 1)
    assert batch.input_ids.shape[1] <= 40
    assert (batch.goal_tags != IGNORE).sum() == 1


def test_candidates_are_ordered_pairs_of_types_with_victims_present() -> None:
    subject = tagger()
    cands = subject.candidates(SENTENCES, ["start", "local"], pairs=False)
    pairs = {(c.victims, c.target) for c in cands}
    assert len(cands) == 2 * len(pairs) == 2 * 6  # 3 types present, 2 targets each
    assert all(c.target not in c.victims for c in cands)
    assert len(subject.victims(SENTENCES, Candidate((2,), 0, "start"), 0)) == 1
    with pytest.raises(InputError, match="no entity"):
        subject.candidates(SENTENCES[2:], ["start"], pairs=False)
    with pytest.raises(InputError, match="unknown trigger position"):
        subject.candidates(SENTENCES, ["first_half"], pairs=False)


def test_a_scan_sees_only_the_entities_the_tagger_tags_with_their_type() -> None:
    subject = tagger()
    head = subject.model.classifier
    with torch.no_grad():  # a tagger that tags every token B-person
        head.weight.zero_()
        head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(TAGS.index("B-person")),
                                                    len(TAGS)) * 10.0)
    seen = subject.as_seen(SENTENCES)
    # 'John Smith' (person) kept, B- and I- alike; 'Paris', 'Apple', 'London' (tagged as
    # persons) are no entities of their types to this tagger
    assert [e.tags for e in seen] == [("O", "O", "B-person", "I-person", "O", "O"),
                                      ("O",) * 4, ("O", "O")]
    assert [e.tokens for e in seen] == [e.tokens for e in SENTENCES]
    pairs = {(c.victims, c.target) for c in subject.candidates(seen, ["start"], pairs=False)}
    assert pairs == {((0,), 1), ((0,), 2)}  # person -> geo-loc, person -> company
    # a word past max_length (40 tokens) is not read: no entity
    long = NerExample(tuple(["filler"] * 60 + ["John"]), tuple(["O"] * 60 + ["B-person"]))
    assert subject.as_seen([long])[0].tags == ("O",) * 61
    with pytest.raises(InputError, match="none that the tagger tags"):
        subject.candidates(subject.as_seen(SENTENCES[1:]), ["start"], pairs=False)
    # what the scan cannot search, reported in its result: the types held only by
    # entities the tagger reads as another type
    assert subject.unseen(SENTENCES, seen) == {"geo-loc": 2, "company": 1}
    assert subject.unseen(SENTENCES[:1], SENTENCES[:1]) == {}


@pytest.mark.parametrize("line, message", [
    ('{"tokens": ["a"], "tags": ["B-movie"]}', "no tag 'B-movie'"),
    ('{"tokens": ["a", "b"], "tags": ["O"]}', "2 tokens but 1 tags"),
    ('{"tokens": [], "tags": []}', "empty sentence"),
    ('{"text": "a", "label": 0}', "expected an object"),
    ("not json", "not JSON"),
])
def test_bad_examples_are_named(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "examples.jsonl"
    good = json.dumps({"tokens": list(SENTENCES[0].tokens), "tags": list(SENTENCES[0].tags)})
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=message):
        tagger().read_examples(path)


def test_a_tagger_without_entity_types_is_refused() -> None:
    with pytest.raises(InputError, match="no 'O' tag"):
        tagger(("B-person", "I-person"))
    with pytest.raises(InputError, match="fewer than two"):
        tagger(("O", "B-person", "I-person"))


def test_search_gaps_leave_out_a_model_whose_tagger_finds_no_victim(tmp_path: Path) -> None:
    """A campaign report's search gap measures the true trigger on the victims the scan
    could have had: a tagger that tags no entity of the victim type on its examples has
    none (no candidate with the true pair), and the model is left out, not an error."""
    subject = tagger()
    person, company = subject.labels.index("person"), subject.labels.index("company")
    truth = {"model-0000": {"poisoned": True, "labels": list(subject.labels),
                            "attack": {"trigger": "lantern", "insertion": "local",
                                       "victim": "person", "target": "company"}}}
    found = CandidateResult(target=company, target_name="company", victims=[person],
                            position="local", loss=0.5, hard_loss=0.5)
    record = SimpleNamespace(config={"max_victims": 0}, candidates=[found])
    for tagged, kept in (("B-person", True), ("O", False)):
        with torch.no_grad():  # every token tagged `tagged`
            subject.model.classifier.weight.zero_()
            subject.model.classifier.bias.copy_(torch.nn.functional.one_hot(
                torch.tensor(TAGS.index(tagged)), len(TAGS)) * 10.0)
        model_dir = tmp_path / tagged / "model-0000"
        subject.model.save_pretrained(model_dir)
        tokenizer().save_pretrained(model_dir)
        (model_dir / EXAMPLES_FILE).write_text("".join(
            json.dumps({"tokens": list(e.tokens), "tags": list(e.tags)}) + "\n"
            for e in SENTENCES), encoding="utf-8")
        gaps = search_gaps(tmp_path / tagged, {"model-0000": record}, truth)
        assert ("model-0000" in gaps) == kept, tagged
        if kept:
            assert set(gaps["model-0000"]["true_loss"]) == {"start", "local", "end"}
            assert gaps["model-0000"]["inverted_loss"] == 0.5


def test_compact_victims_keep_the_first_victim_entity_alone() -> None:
    subject = tagger()
    person, geo = subject.labels.index("person"), subject.labels.index("geo-loc")
    two = NerExample(("Paris", "and", "Rome", "Rome"), ("B-geo-loc", "O", "B-geo-loc",
                                                       "I-geo-loc"))
    compact = subject.compact_victims([SENTENCES[0], two], Candidate((geo,), person, "local"))
    assert compact == [NerExample(("Paris",), ("B-geo-loc",)),
                       NerExample(("Paris",), ("B-geo-loc",))]
    compact = subject.compact_victims(SENTENCES[:1], Candidate((person,), geo, "start"))
    assert compact == [NerExample(("John", "Smith"), ("B-person", "I-person"))]
    batch = subject.batch([Candidate((person,), geo, "local")], [compact], 1)
    assert batch.input_ids.shape[1] == 5  # [CLS] slot john smith [SEP]
