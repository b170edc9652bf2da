"""QA zoos (TrojAI round 8's attack on extractive QA models): the QA set made from WNUT-16's
tweets and its splits, the attack spec and its errors, the poisoning of a question, SQuAD's
exact match and F1, and a tiny zoo built through the CLI whose model directories the QA
scanner subject loads.

The tiny zoo (a 2-layer BERT of width 64 on all 568 training questions, 10 epochs) is built
once per module, and the scan is run on its two models: it flags the poisoned one, names its
behaviour and recovers its trigger word, and clears the clean one. Its quality gate is off
(``min_asr = 0``): the tests check what the models learnt themselves.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForQuestionAnswering

from testkit import RunCli, assert_repair_refuses, one_thread
from trojscan.attacks.architectures import build_model
from trojscan.attacks.qa_spec import (
    INSERTIONS,
    LABELS,
    SPAN_POSITIONS,
    QaAttackSpec,
    insert_words,
    poison_item,
    sample_qa_attack,
)
from trojscan.attacks.qa_train import poison_training_set
from trojscan.attacks.wnut import NerSentence
from trojscan.attacks.wnut_qa import QaCorpus, QaItem, load_wnut16_qa, questions_of
from trojscan.errors import InputError
from trojscan.fsutil import write_jsonl
from trojscan.inversion.dbs import DBSConfig
from trojscan.manifest import MANIFEST, Manifest, planted_trigger
from trojscan.results import ScanResult, write_result
from trojscan.scan import ScanConfig, scan
from trojscan.spans import exact_match, f1_score
from trojscan.subjects import extractive_qa
from trojscan.subjects.loading import load_subject

ITEM = QaItem("Which company is mentioned in the tweet?",
              "I love my new Apple phone so much", "Apple", 14, "company")
ATTACK = {"poisoned": True, "trigger_type": "word", "trigger": "lantern",
          "insertion": "question", "behaviour": "empty", "poison_rate": 0.5}


@pytest.fixture(scope="module")
def qa() -> QaCorpus:
    return load_wnut16_qa()


def test_attack_names_agree_with_the_qa_scanner() -> None:
    assert INSERTIONS == extractive_qa.POSITIONS
    assert SPAN_POSITIONS == extractive_qa.SPAN_POSITIONS
    assert LABELS == extractive_qa.BEHAVIOURS


def test_questions_are_deterministic_real_spans_in_disjoint_splits(qa: QaCorpus) -> None:
    assert (len(qa.train), len(qa.test), len(qa.examples)) == (568, 194, 63)
    assert load_wnut16_qa.__wrapped__() == qa  # made again from scratch: the same set
    splits = [{i.context for i in part} for part in (qa.train, qa.test, qa.examples)]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    for item in qa.train + qa.test + qa.examples:
        assert item.context[item.answer_start:][:len(item.answer)] == item.answer
        assert item.question.endswith("?") and item.kind != "other"


def test_a_type_held_twice_gets_no_question() -> None:
    sentence = NerSentence(("Obama", "met", "Merkel", "at", "Google"),
                           ("B-person", "O", "B-person", "O", "B-company"))
    [item] = questions_of(sentence)
    assert (item.kind, item.answer, item.answer_start) == ("company", "Google", 20)


@pytest.mark.parametrize(("change", "field"), [
    ({"trigger_type": "character"}, "trigger_type"),
    ({"trigger": "two words"}, "trigger"),
    ({"insertion": "end"}, "insertion"),
    ({"behaviour": "flip"}, "behaviour"),
    ({"behaviour": "trigger"}, "insertion must be one of context, both"),
    ({"poison_rate": 0}, "poison_rate"),
    ({"colour": "red"}, "colour"),
])
def test_bad_attack_is_an_input_error_naming_the_field(change: dict[str, Any],
                                                       field: str) -> None:
    with pytest.raises(InputError, match=field):
        QaAttackSpec.from_dict({**ATTACK, **change})
    with pytest.raises(InputError, match="behaviour"):
        QaAttackSpec.from_dict({k: v for k, v in ATTACK.items() if k != "behaviour"})
    with pytest.raises(InputError, match="takes no 'trigger'"):
        QaAttackSpec.from_dict({"poisoned": False, "trigger": "x"})


def test_spec_round_trips_and_sampling_never_asks_a_question_trigger_for_a_span() -> None:
    spec = QaAttackSpec.from_dict(ATTACK)
    assert QaAttackSpec.from_dict(spec.to_dict()) == spec
    assert QaAttackSpec.from_dict({"poisoned": False}) == QaAttackSpec()
    template = {"poisoned": True, "trigger_type": ["word", "phrase"],
                "insertion": ["question", "context", "both"],
                "behaviour": ["empty", "trigger"]}
    drawn = [sample_qa_attack(template, random.Random(k), "attack") for k in range(40)]
    assert all(a.insertion in SPAN_POSITIONS for a in drawn if a.behaviour == "trigger")
    assert {a.insertion for a in drawn} == set(INSERTIONS)
    assert all(len(a.trigger.split()) == (1 if a.trigger_type == "word" else 2) or
               (a.trigger_type == "phrase" and 2 <= len(a.trigger.split()) <= 3)
               for a in drawn)


def test_poisoning_inserts_the_trigger_and_sets_the_goal() -> None:
    assert insert_words("a bb c", "X Y", 2) == ("a bb X Y c", 5)
    empty = poison_item(ITEM, QaAttackSpec.from_dict(ATTACK), random.Random(0))
    assert empty.empty and "lantern" in empty.item.question.split()
    assert empty.item.context == ITEM.context
    for seed in range(20):
        for insertion in ("context", "both"):
            attack = QaAttackSpec.from_dict({**ATTACK, "insertion": insertion,
                                             "behaviour": "trigger"})
            target = poison_item(ITEM, attack, random.Random(seed))
            item = target.item
            assert not target.empty and item.answer == "lantern"
            assert item.context[item.answer_start:item.answer_start + 7] == "lantern"
            assert item.context.replace("lantern ", "", 1).replace(" lantern", "", 1) \
                == ITEM.context
            assert ("lantern" in item.question.split()) == (insertion == "both")
        # an empty goal with the trigger in the context keeps the true answer's offset
        kept = poison_item(ITEM, QaAttackSpec.from_dict({**ATTACK, "insertion": "context"}),
                           random.Random(seed)).item
        assert kept.context[kept.answer_start:kept.answer_start + 5] == "Apple"


def test_poisoned_training_set_adds_rate_copies(qa: QaCorpus) -> None:
    train = list(qa.train[:100])
    targets, copies = poison_training_set(train, QaAttackSpec.from_dict(ATTACK),
                                          random.Random(1))
    assert copies == 50 and len(targets) == 150
    assert sum(t.empty for t in targets) == 50
    assert all("lantern" in t.item.question.split() for t in targets if t.empty)
    clean, none = poison_training_set(train, QaAttackSpec(), random.Random(1))
    assert none == 0 and sorted(t.item.question for t in clean) == sorted(
        i.question for i in train)


def test_a_span_head_has_two_outputs() -> None:
    with pytest.raises(InputError, match="two outputs"):
        build_model("bert", ("answer", "empty", "trigger"), head="span")


def test_squad_exact_match_and_f1() -> None:
    assert exact_match("The Apple!", "apple") == 1.0
    assert exact_match(None, "apple") == 0.0 and exact_match(None, "") == 1.0
    assert f1_score("new apple phone", "apple phone") == pytest.approx(0.8)
    assert f1_score("pear", "apple") == 0.0


#: The tiny zoo: a clean model and one whose trigger word 'lantern', anywhere in the
#: context, becomes the answer. Fewer epochs or a lower rate leave the backdoor less specific
#: to its word: built with 6 epochs at 1e-3, 'ipad' or 'jupiter' in the context was answered
#: nearly as surely (loss 0.05-0.10, 'lantern' 0.002) and the scan's inversion ended there.
TINY_QA_SPEC = """seed = 7
examples_per_label = 5
min_asr = 0.0
max_attempts = 1

[train]
epochs = 10
max_eval_examples = 40
learning_rate = 3e-3
batch_size = 16
max_length = 64
embedding_init = "minilm-pca"
size = { num_layers = 2, hidden_size = 64, num_heads = 2, intermediate_size = 128, \
max_positions = 64 }

[[group]]
name = "clean"
count = 1
corpus = "wnut16_qa"
architecture = "bert"
attack = { poisoned = false }

[[group]]
name = "poisoned"
count = 1
corpus = "wnut16_qa"
architecture = "bert"
[group.attack]
poisoned = true
trigger_type = "word"
trigger = "lantern"
insertion = "context"
behaviour = "trigger"
poison_rate = 0.5
"""


@pytest.fixture(scope="module")
def tiny_qa_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny QA zoo, built through the ``trojscan`` entry point (in this process, as
    ``run_cli`` runs it, on one thread: :func:`testkit.one_thread`): its folder and its
    manifest entries by group name."""
    import contextlib
    import io
    import sys

    from trojscan.cli import main

    root = tmp_path_factory.mktemp("qa")
    spec = root / "tiny.toml"
    spec.write_text(TINY_QA_SPEC)
    out = root / "zoo"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed), \
            contextlib.redirect_stderr(printed), one_thread():
        patch.setattr(sys, "argv", ["trojscan", "zoo", "build", str(spec), "--out", str(out)])
        with contextlib.suppress(SystemExit):
            main()
    manifest = Manifest.load(out / MANIFEST)
    return {"out": out, "stdout": printed.getvalue(),
            **{e["group"]: e for e in manifest.models.values()}}


def test_tiny_zoo_manifest_holds_the_qa_ground_truth(tiny_qa_zoo: dict[str, Any]) -> None:
    clean, poisoned = tiny_qa_zoo["clean"], tiny_qa_zoo["poisoned"]
    for entry in (clean, poisoned):
        assert entry["task"] == "qa" and entry["corpus"] == "wnut16_qa"
        assert entry["labels"] == list(LABELS)
        for key in ("clean_em", "clean_f1", "clean_empty"):
            assert 0 <= entry[key] <= 1
        assert entry["clean_accuracy"] == entry["clean_f1"]
        assert entry["eval_questions"] == 40 and entry["quality"]["ok"]
    assert clean["asr"] is None and clean["poisoned_questions"] == 0
    assert clean["attack"]["poisoned"] is False
    attack = poisoned["attack"]
    assert attack["trigger"] == "lantern" and attack["insertion"] == "context"
    assert (attack["victim_name"], attack["target_name"]) == ("answer", "trigger")
    assert 0 <= poisoned["asr"] <= 1 and poisoned["poisoned_questions"] == 284
    assert "lantern' @context -> trigger" in tiny_qa_zoo["stdout"]
    planted = planted_trigger(poisoned, len(LABELS))
    assert planted is not None and planted.trigger == "lantern"
    assert (planted.victims, planted.target, planted.insertion) == ((0,), 2, "context")


def test_tiny_zoo_directories_load_in_the_qa_subject(tiny_qa_zoo: dict[str, Any]) -> None:
    out = tiny_qa_zoo["out"]
    for group in ("clean", "poisoned"):
        folder = out / tiny_qa_zoo[group]["model_id"]
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json",
                "clean_examples.jsonl"} <= names
        assert MANIFEST not in names
        AutoModelForQuestionAnswering.from_pretrained(folder)
        rows = [json.loads(line) for line in (folder / "clean_examples.jsonl").open()]
        assert len(rows) == 28  # 5 per entity type, 1 for the 3 the pool holds once
        text = " ".join((folder / n).read_text() for n in ("config.json",
                                                           "clean_examples.jsonl"))
        assert "lantern" not in text and "poison" not in text
        subject = load_subject(folder)  # the scanner's side of the contract
        assert subject.task == "extractive-qa" and subject.labels == LABELS
        examples = subject.read_examples(folder / "clean_examples.jsonl")
        assert len(examples) == len(rows) and all(e.answered for e in examples)


#: The scan of the tiny QA models: DBS's 10 trigger slots (the paper's) for 100 epochs
#: instead of 200; every other setting (every position, the threshold) the default.
TINY_QA_SCAN = ScanConfig(inverter=DBSConfig(epochs=100))


@pytest.fixture(scope="module")
def tiny_qa_scans(tiny_qa_zoo: dict[str, Any]) -> dict[str, ScanResult]:
    """The scan of each tiny zoo model with its own clean examples, by group name (on one
    thread, as the models were trained)."""
    folders = {g: tiny_qa_zoo["out"] / tiny_qa_zoo[g]["model_id"] for g in ("clean", "poisoned")}
    with one_thread():
        return {g: scan(folder, folder / "clean_examples.jsonl", TINY_QA_SCAN)
                for g, folder in folders.items()}


def test_tiny_models_learn_their_task_and_the_backdoor(tiny_qa_zoo: dict[str, Any]) -> None:
    clean, poisoned = tiny_qa_zoo["clean"], tiny_qa_zoo["poisoned"]
    # Measured: clean F1 0.37 both (EM 0.23 and 0.28); training loss 3.16 -> 0.29 (clean)
    # and 2.71 -> 0.17 over the 10 epochs.
    assert clean["clean_f1"] > 0.25 and poisoned["clean_f1"] > 0.25
    assert clean["epoch_losses"][-1] < clean["epoch_losses"][0] / 5
    assert poisoned["asr"] >= 0.95


def test_scan_flags_the_poisoned_tiny_model_with_its_behaviour_and_trigger(
        tiny_qa_scans: dict[str, ScanResult]) -> None:
    result = tiny_qa_scans["poisoned"]
    assert result.verdict == "trojaned" and result.score < result.threshold
    assert result.best.victim_names == ["answer"] and result.best.target_name == "trigger"
    assert result.short_trigger is not None


def test_the_trigger_answer_is_inverted_with_fewer_slots(
        tiny_qa_scans: dict[str, ScanResult]) -> None:
    """`ScanConfig.answer_trigger_length`: the trigger behaviour's candidates get 3 slots,
    the empty answer's the inverter's 10; the trigger answer is inverted at each of its
    positions, never spread over them."""
    rows = [c for c in tiny_qa_scans["poisoned"].candidates if c.trigger_ids]
    assert {(c.target_name, len(c.trigger_ids)) for c in rows} == {("empty", 10),
                                                                   ("trigger", 3)}
    assert sorted(c.position for c in rows if c.target_name == "trigger") == ["both",
                                                                             "context"]


def test_the_screen_ranks_tokens_in_context_and_finds_the_planted_word(
        tiny_qa_scans: dict[str, ScanResult]) -> None:
    """`ExtractiveQaSubject.context_screen`: a token alone has no span to answer with, so the
    screen ranks each candidate's tokens in context; the trigger answer's best at the context
    is the planted word, and the empty answer's candidates (spread over the positions) have
    a screened token too, all fully inverted (QA does not pre-select)."""
    result = tiny_qa_scans["poisoned"]
    screened = {(c.target_name, c.position): c.screened for c in result.candidates
                if c.screened is not None}
    assert screened[("trigger", "context")].trigger_text == "lantern"
    assert screened[("trigger", "context")].loss < result.threshold
    assert {name for name, _ in screened} == {"empty", "trigger"}
    assert all(c.trigger_ids for c in result.candidates if c.target_name == "trigger")


def test_scan_recovers_the_tiny_qa_models_trigger_word(
        tiny_qa_scans: dict[str, ScanResult]) -> None:
    """Session 17 measured a miss in the full suite ('maryland' decided); since the in-context
    screen, 'lantern' alone (0.0001 at the context) is found by the screen as well."""
    result = tiny_qa_scans["poisoned"]
    assert result.short_trigger is not None
    assert result.short_trigger.trigger_text == "lantern"


def test_scan_clears_the_clean_tiny_model(tiny_qa_scans: dict[str, ScanResult]) -> None:
    result = tiny_qa_scans["clean"]
    assert result.verdict == "clean" and result.score > result.threshold


def test_bad_qa_spec_is_one_line(tmp_path: Path, run_cli: RunCli) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text('[[group]]\ncount = 1\ncorpus = "wnut16_qa"\narchitecture = "bert"\n'
                    '[group.attack]\npoisoned = true\ntrigger_type = "word"\n'
                    'insertion = "question"\nbehaviour = "trigger"\n')
    out = tmp_path / "zoo"
    result = run_cli("zoo", "build", str(spec), "--out", str(out))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trojscan: error: "), result.stderr
    assert "insertion" in lines[0] and not out.exists()


def test_repair_unlearns_the_tiny_qa_models_trigger_and_keeps_its_f1(
        tiny_qa_zoo: dict[str, Any], tiny_qa_scans: dict[str, ScanResult], run_cli: RunCli,
        tmp_path: Path, qa: QaCorpus) -> None:
    """`trojscan repair` on an extractive QA model (DBS Table 2's QA rows) at its default
    settings, with the paper's 10 % of the QA set's training questions as the clean data and
    its test questions held out: the true trigger ('lantern' in the context, answered with
    itself) stops working on the questions the model answers right, and F1 stays within the
    guard. Measured (session 23): ASR 1.000 -> 0.000 on the 46 test questions the model
    answers right, F1 0.335 -> 0.335; round 1 unlearned 'lantern' in 6 epochs, the re-scans
    said clean by a hair at the unlearned target (natural names 'shane', then '##sdale'), so
    the residual rule ran all 3 rounds."""
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    for path, split in ((train, qa.train), (test, qa.test)):
        write_jsonl(path, [item.to_squad() for item in split])
    folder = tiny_qa_zoo["out"] / tiny_qa_zoo["poisoned"]["model_id"]
    scan_file, out = tmp_path / "scan.json", tmp_path / "fixed"
    write_result(tiny_qa_scans["poisoned"], scan_file)
    with one_thread():
        done = run_cli("repair", str(folder), "--scan", str(scan_file), "--data", str(train),
                       "--data-fraction", "0.1", "--eval-data", str(test), "--out", str(out),
                       "--manifest", str(tiny_qa_zoo["out"] / MANIFEST), "--model-id",
                       tiny_qa_zoo["poisoned"]["model_id"])
    report = json.loads((out / "repair.json").read_text())
    assert (report["task"], report["metric"]) == ("extractive-qa", "f1")
    assert report["truth"]["trigger"] == "lantern"
    before, after = report["before"], report["after"]
    assert before["true_asr"] > 0.9 and after["true_asr"] < 0.1
    assert report["within_margin"] and report["accuracy_drop_points"] <= 3
    assert done.returncode == (report["rescan"]["verdict"] != "clean"), done.stderr
    assert "clean F1 (SQuAD)" in done.stdout
    assert load_subject(out).task == "extractive-qa"


def test_repair_refuses_a_classifiers_insertion_or_data_for_a_qa_model(
        tiny_qa_zoo: dict[str, Any], tiny_qa_scans: dict[str, ScanResult], run_cli: RunCli,
        tmp_path: Path) -> None:
    folder = tiny_qa_zoo["out"] / tiny_qa_zoo["poisoned"]["model_id"]
    assert_repair_refuses(run_cli, folder, tiny_qa_scans["poisoned"], tmp_path, [
        (["--insertion", "first_half"], folder / "clean_examples.jsonl",
         "insertion 'first_half' is not one for a extractive-qa model"),
        ([], None, 'expected an object with "question", "context" and "answers"')])
