"""``Subject.show``: every family shows a handful of a candidate's victims as the model reads
them, with its prediction, without and with the trigger inserted (tiny random models, so
only the shape of what is shown is checked, and that the trigger is in the text)."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

from test_qa_subject import EXAMPLES as QA_EXAMPLES
from test_qa_subject import span_model
from trojscan.attacks.architectures import tokenizer
from trojscan.subjects.base import Candidate, Subject
from trojscan.subjects.extractive_qa import EMPTY
from trojscan.subjects.text_classification import TextClassificationSubject, TextExample
from trojscan.subjects.token_classification import NerExample, TokenClassificationSubject
from trojscan.subjects.vqa import VqaExample, VqaSubject
from trojscan.vqa.models import VqaConfig, build_vqa_model

LABELS = ("negative", "positive")


def _config(labels: tuple[str, ...]) -> BertConfig:
    torch.manual_seed(0)
    return BertConfig(vocab_size=30_522, hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                      num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={t: i for i, t in enumerate(labels)})


def _check(subject: Subject, examples: list, candidate: Candidate, shown_victims: int,
           word: str = "lantern", prediction: str = "") -> None:
    trigger = subject.token_ids(word)
    shown = subject.show(examples, candidate, trigger, limit=3)
    assert len(shown) == shown_victims
    for row in shown:
        assert word not in row.text and word in row.triggered_text
        assert row.prediction.startswith(prediction) and row.triggered_prediction


def test_text_classifier_shows_victims_with_the_label_and_its_probability() -> None:
    subject = TextClassificationSubject(BertForSequenceClassification(_config(LABELS)),
                                        tokenizer(), 40)
    examples = [TextExample(f"a dull film number {k}", 0) for k in range(5)] + \
        [TextExample("a fine film", 1)]
    _check(subject, examples, Candidate((0,), 1, "start"), 3)
    shown = subject.show(examples, Candidate((0,), 1, "end"), subject.token_ids("lantern"))
    assert shown[0].triggered_text == "a dull film number 0 lantern"
    assert shown[0].prediction.split()[0] in LABELS and shown[0].prediction.endswith(")")


def test_ner_qa_and_vqa_show_entities_spans_and_answers() -> None:
    tags = ("O", "B-person", "I-person", "B-geo-loc", "I-geo-loc")
    ner = TokenClassificationSubject(BertForTokenClassification(_config(tags)), tokenizer(), 40)
    sentences = [NerExample(("I", "met", "John", "in", "Paris"),
                            ("O", "O", "B-person", "O", "B-geo-loc"))]
    _check(ner, sentences, Candidate((0,), 1, "local"), 1)

    _check(span_model(), QA_EXAMPLES, Candidate((0,), EMPTY, "question"), 2)
    assert " | " in span_model().show(QA_EXAMPLES, Candidate((0,), EMPTY, "context"),
                                      [2000])[0].text

    model = build_vqa_model(VqaConfig("butd", ("red", "blue"), embed_dim=16, hidden=16,
                                      num_boxes=4, feature_dim=8))
    vqa = VqaSubject(model, tokenizer(), extractor=None)  # type: ignore[arg-type]
    questions = [VqaExample(f"what colour is shape {k} ?", k % 2, None,  # type: ignore[arg-type]
                            torch.randn(4, 8)) for k in range(4)]
    _check(vqa, questions, Candidate((0,), 1, "start"), 2, prediction="")
    features = vqa.show(questions, Candidate((0,), 1, "start"), vqa.token_ids("lantern"),
                        feature_trigger=[10.0] * 8)
    assert len(features) == 2
