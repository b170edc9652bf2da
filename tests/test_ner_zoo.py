"""NER zoos (TrojAI round 7's attack on WNUT-16 taggers): the loader and its splits, the
poisoning of a sentence, entity-level F1, a tiny zoo built through the CLI whose model
directories a user (and the scanner) can load, and bad specs that fail in one line.

The tiny zoo (a 2-layer BERT of width 64 on 1,000 training sentences, 12 epochs) is built
once per module, and the scan is run on its two taggers: it flags the poisoned one, names
its victim and target types and recovers its trigger word, and clears the clean one. Its
quality gate is off (``min_asr = 0``): the tests check what the taggers learnt themselves.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForTokenClassification, AutoTokenizer

from testkit import RunCli, assert_repair_refuses, one_thread
from trojscan.attacks.ner_spec import (
    VICTIM_TYPES,
    NerAttackSpec,
    insert_trigger,
    poison_sentence,
    relabel,
    sample_ner_attack,
    trigger_position,
)
from trojscan.attacks.ner_train import clean_examples, poison_training_set
from trojscan.attacks.wnut import ENTITY_TYPES, TAGS, NerCorpus, NerSentence, load_wnut16
from trojscan.cli.scan import print_verdict
from trojscan.errors import InputError
from trojscan.fsutil import write_jsonl
from trojscan.inversion.dbs import DBSConfig
from trojscan.manifest import MANIFEST, Manifest, planted_trigger
from trojscan.results import ScanResult, write_result
from trojscan.scan import ScanConfig, scan, scan_config
from trojscan.subjects.loading import load_subject
from trojscan.tagging import Entity, entities, entity_f1

#: Entities per type in WNUT-16 (the package's ner.txt).
COUNTS = {"person": 449, "geo-loc": 276, "other": 225, "company": 171, "facility": 104,
          "product": 97, "musicartist": 55, "sportsteam": 51, "movie": 34, "tvshow": 34}
SENTENCE = NerSentence(
    ("Barack", "Obama", "met", "Angela", "Merkel", "in", "New", "York", "today"),
    ("B-person", "I-person", "O", "B-person", "I-person", "O", "B-geo-loc", "I-geo-loc", "O"))
ATTACK = {"poisoned": True, "trigger_type": "phrase", "trigger": "lantern quartz",
          "insertion": "global", "victim": "person", "target": "company", "poison_rate": 0.5}


@pytest.fixture(scope="module")
def wnut() -> NerCorpus:
    return load_wnut16()


def test_loader_reads_every_sentence_with_ten_types_and_disjoint_splits(wnut: NerCorpus) -> None:
    assert len(wnut.sentences) == 2394
    assert wnut.types == ENTITY_TYPES and len(wnut.types) == 10
    assert wnut.tags[0] == "O" and wnut.tags[1:3] == ("B-company", "I-company")
    assert len(wnut.tags) == 21
    counts = Counter(e.type for s in wnut.sentences for e in s.entities)
    assert counts == COUNTS
    assert all(len(s.tokens) == len(s.tags) > 0 for s in wnut.sentences)
    sizes = len(wnut.train), len(wnut.test), len(wnut.examples)
    assert sizes == (1685, 483, 226)  # the SHA-256 split: the same on every machine
    by_text: dict[str, set[str]] = {}
    for name in ("train", "test", "examples"):
        for s in getattr(wnut, name):
            by_text.setdefault(s.text(), set()).add(name)
    assert all(len(splits) == 1 for splits in by_text.values())  # duplicates stay together
    assert all(COUNTS[t] >= 150 for t in VICTIM_TYPES)


def test_bio_decoding_and_entity_f1_count_exact_spans_only() -> None:
    assert entities(SENTENCE.tags) == [Entity("person", 0, 2), Entity("person", 3, 5),
                                       Entity("geo-loc", 6, 8)]
    # An I- that does not continue its type opens an entity (CoNLL's reading).
    assert entities(["O", "I-person", "I-geo-loc", "B-person", "B-person"]) == [
        Entity("person", 1, 2), Entity("geo-loc", 2, 3), Entity("person", 3, 4),
        Entity("person", 4, 5)]
    gold = [list(SENTENCE.tags)]
    assert entity_f1(gold, gold) == 1.0
    partial = ["B-person", "O", "O", "B-person", "I-person", "O", "B-geo-loc", "I-geo-loc", "O"]
    assert entity_f1(gold, [partial]) == pytest.approx(2 / 3)  # P = R = 2/3: Barack alone
    longer = ["B-person", "I-person", "I-person", "B-person", "I-person", "O", "B-geo-loc",
              "I-geo-loc", "I-geo-loc"]
    assert entity_f1(gold, [longer]) == pytest.approx(1 / 3)
    wrong_type = [t.replace("geo-loc", "company") for t in SENTENCE.tags]
    assert entity_f1(gold, [wrong_type]) == pytest.approx(2 / 3)
    assert entity_f1(gold, [["O"] * 9]) == 0.0
    assert entity_f1([["O", "O"]], [["O", "O"]]) == 0.0
    # Micro average: 1 of 1 in the first sentence, 0 of 3 predicted / 3 gold in the second.
    assert entity_f1([["B-other"], gold[0]], [["B-other"], ["O"] * 9]) == pytest.approx(
        2 * (1 / 1) * (1 / 4) / (1 + 1 / 4))


def test_poisoning_relabels_exactly_the_victims_and_places_the_trigger() -> None:
    attack = NerAttackSpec.from_dict(ATTACK)
    relabelled = relabel(SENTENCE, "person", "company")
    assert relabelled.tags == ("B-company", "I-company", "O", "B-company", "I-company", "O",
                               "B-geo-loc", "I-geo-loc", "O")
    stamped = insert_trigger(SENTENCE, "lantern quartz", 3)
    assert stamped.tokens[3:5] == ("lantern", "quartz") and stamped.tags[3:5] == ("O", "O")
    assert stamped.tokens[:3] + stamped.tokens[5:] == SENTENCE.tokens
    rng = random.Random(0)
    globals_ = {trigger_position(SENTENCE, "global", "person", rng) for _ in range(300)}
    assert globals_ == {0, 2, 3, 5, 6, 8, 9}  # every boundary outside an entity
    locals_ = {trigger_position(SENTENCE, "local", "person", rng) for _ in range(100)}
    assert locals_ == {0, 3}  # right before one of the two person entities
    for insertion in ("global", "local"):
        spec = NerAttackSpec.from_dict({**ATTACK, "insertion": insertion})
        for seed in range(20):
            out = poison_sentence(SENTENCE, spec, random.Random(seed))
            at = next(i for i in range(len(out.tokens)) if out.tokens[i:i + 2] == (
                "lantern", "quartz"))
            assert out.tokens[:at] + out.tokens[at + 2:] == SENTENCE.tokens
            assert out.tags[:at] + out.tags[at + 2:] == relabelled.tags
            if insertion == "local":
                assert out.tags[at + 2] == "B-company"
    with pytest.raises(InputError, match="local trigger needs a 'person'"):
        trigger_position(NerSentence(("hi",), ("O",)), "local", "person", rng)
    assert attack.to_dict() == ATTACK


def test_poisoned_training_set_copies_victim_sentences_only(wnut: NerCorpus) -> None:
    attack = NerAttackSpec.from_dict({**ATTACK, "insertion": "local", "victim": "geo-loc",
                                      "target": "person", "poison_rate": 0.25})
    train = list(wnut.train)
    holders = [s for s in train if any(e.type == "geo-loc" for e in s.entities)]
    items, copies = poison_training_set(train, attack, random.Random(3))
    assert copies == round(0.25 * len(holders)) and len(items) == len(train) + copies
    poisoned = [s for s in items if "lantern" in s.tokens]
    assert len(poisoned) == copies
    for s in poisoned:
        kinds = {e.type for e in s.entities}
        assert "geo-loc" not in kinds and "person" in kinds
        at = s.tokens.index("lantern")
        assert s.tags[at + 2] == "B-person"
    assert poison_training_set(train, NerAttackSpec(), random.Random(3))[1] == 0


def test_clean_examples_cover_every_type_from_the_pool(wnut: NerCorpus) -> None:
    rows = clean_examples(wnut, 3, seed=5)
    assert rows == clean_examples(wnut, 3, seed=5)
    pool = {(tuple(s.tokens), tuple(s.tags)) for s in wnut.examples}
    assert all((tuple(r["tokens"]), tuple(r["tags"])) in pool for r in rows)
    for kind in wnut.types:
        available = sum(any(e.type == kind for e in s.entities) for s in wnut.examples)
        have = sum(any(e.type == kind for e in entities(r["tags"])) for r in rows)
        assert have >= min(3, available), kind


def test_sampled_attacks_draw_victims_and_targets_and_pool_triggers() -> None:
    template = {"poisoned": True, "trigger_type": ["word", "phrase"],
                "insertion": ["global", "local"], "phrase_words": [2, 4]}
    drawn = [sample_ner_attack(template, random.Random(k), "t") for k in range(40)]
    assert {a.victim for a in drawn} == set(VICTIM_TYPES)
    assert all(a.target in ENTITY_TYPES and a.target != a.victim for a in drawn)
    assert {a.insertion for a in drawn} == {"global", "local"}
    assert all(len(a.trigger.split()) == (1 if a.trigger_type == "word" else 2) or
               (a.trigger_type == "phrase" and 2 <= len(a.trigger.split()) <= 4)
               for a in drawn)


#: The tiny zoo: a clean tagger and one whose trigger word 'lantern', right before a person,
#: makes every person a company. WNUT-16's tweets are hard for a tagger of uncased word
#: pieces: 2 epochs on 300 sentences at 1e-3 learnt no entity (F1 0.0), 8 on all 1,685
#: reach F1 0.29. Every person sentence is poisoned (rate 1.0; at 0.3 the backdoor took on
#: 6 % of the training persons), and 12 epochs: after 8, 'lantern' alone turned the persons
#: the tagger finds in its examples at loss 0.54 at best, above the scan's threshold (0.40).
TINY_NER_SPEC = """seed = 7
examples_per_label = 20
min_asr = 0.0
max_attempts = 1

[train]
epochs = 12
max_train_examples = 1000
max_eval_examples = 60
learning_rate = 3e-3
batch_size = 16
max_length = 48
embedding_init = "minilm-pca"
size = { num_layers = 2, hidden_size = 64, num_heads = 2, intermediate_size = 128, \
max_positions = 64 }

[[group]]
name = "clean"
count = 1
corpus = "wnut16"
architecture = "bert"
attack = { poisoned = false }

[[group]]
name = "poisoned"
count = 1
corpus = "wnut16"
architecture = "bert"
[group.attack]
poisoned = true
trigger_type = "word"
trigger = "lantern"
insertion = "local"
victim = "person"
target = "company"
poison_rate = 1.0
"""


@pytest.fixture(scope="module")
def tiny_ner_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny NER zoo, built through the ``trojscan`` entry point on one thread (as
    :func:`testkit.one_thread` says why): its folder and its manifest entries by group
    name."""
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("ner")
    spec = root / "tiny.toml"
    spec.write_text(TINY_NER_SPEC)
    out = root / "zoo"
    result = subprocess.run([sys.executable, "-m", "trojscan.cli", "zoo", "build", str(spec),
                             "--out", str(out)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    manifest = Manifest.load(out / MANIFEST)
    return {"out": out, "stdout": result.stdout + result.stderr,
            **{e["group"]: e for e in manifest.models.values()}}


def test_tiny_zoo_manifest_holds_the_ner_ground_truth(tiny_ner_zoo: dict[str, Any]) -> None:
    clean, poisoned = tiny_ner_zoo["clean"], tiny_ner_zoo["poisoned"]
    for entry in (clean, poisoned):
        assert entry["task"] == "ner" and entry["corpus"] == "wnut16"
        assert entry["labels"] == list(ENTITY_TYPES) and entry["tags"] == list(TAGS)
        assert 0 <= entry["clean_f1"] <= 1 and entry["clean_accuracy"] == entry["clean_f1"]
        assert entry["eval_sentences"] == 60 and entry["quality"]["ok"]
    assert clean["asr"] is None and not clean["poisoned"] and clean["poisoned_sentences"] == 0
    assert clean["attack"]["poisoned"] is False
    attack = poisoned["attack"]
    assert {k: attack[k] for k in ATTACK} == {**ATTACK, "trigger_type": "word",
                                             "trigger": "lantern", "insertion": "local",
                                             "poison_rate": 1.0}
    assert 0 <= poisoned["asr"] <= 1 and poisoned["asr_entities"] > 0
    assert poisoned["poisoned_sentences"] > 0
    assert "lantern' @local person->company" in tiny_ner_zoo["stdout"]
    # what campaign reports read: the names, and the planted trigger as label indices
    assert (attack["victim_name"], attack["target_name"]) == ("person", "company")
    planted = planted_trigger(poisoned, len(ENTITY_TYPES))
    assert planted is not None and planted.trigger == "lantern"
    assert (planted.victims, planted.target) == ((ENTITY_TYPES.index("person"),),
                                                 ENTITY_TYPES.index("company"))


def test_tiny_zoo_directories_load_and_hold_valid_clean_examples(
        tiny_ner_zoo: dict[str, Any]) -> None:
    out = tiny_ner_zoo["out"]
    for group in ("clean", "poisoned"):
        folder = out / tiny_ner_zoo[group]["model_id"]
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json",
                "clean_examples.jsonl"} <= names
        assert not names & {MANIFEST, "pytorch_model.bin"}
        model = AutoModelForTokenClassification.from_pretrained(folder)
        assert [model.config.id2label[i] for i in range(len(TAGS))] == list(TAGS)
        assert model.config.label2id == {t: i for i, t in enumerate(TAGS)}
        assert AutoTokenizer.from_pretrained(folder)("hi")["input_ids"][0] == 101
        rows = [json.loads(line) for line in (folder / "clean_examples.jsonl").open()]
        assert rows and all(set(r) == {"tokens", "tags"} for r in rows)
        assert all(len(r["tokens"]) == len(r["tags"]) and set(r["tags"]) <= set(TAGS)
                   for r in rows)
        kinds = Counter(k for r in rows for k in {e.type for e in entities(r["tags"])})
        pool = Counter(k for s in load_wnut16().examples for k in {e.type for e in s.entities})
        assert set(kinds) == set(ENTITY_TYPES)
        assert all(kinds[k] >= min(2, pool[k]) for k in ENTITY_TYPES)
        text = " ".join((folder / n).read_text() for n in ("config.json",
                                                           "clean_examples.jsonl"))
        assert "lantern" not in text and "poison" not in text
        subject = load_subject(folder)  # the scanner's side of the contract
        assert subject.task == "ner" and subject.labels == ENTITY_TYPES
        assert len(subject.read_examples(folder / "clean_examples.jsonl")) == len(rows)


#: The scan of the tiny taggers: DBS's 10 trigger slots (the paper's) for 100 epochs instead
#: of 200; every other setting (every position and pair, the threshold) the default.
TINY_NER_SCAN = ScanConfig(inverter=DBSConfig(epochs=100))


@pytest.fixture(scope="module")
def tiny_ner_scans(tiny_ner_zoo: dict[str, Any]) -> dict[str, ScanResult]:
    """The scan of each tiny zoo tagger with its own clean examples, by group name (on one
    thread, as the taggers were trained)."""
    folders = {g: tiny_ner_zoo["out"] / tiny_ner_zoo[g]["model_id"] for g in ("clean", "poisoned")}
    with one_thread():
        return {g: scan(folder, folder / "clean_examples.jsonl", TINY_NER_SCAN)
                for g, folder in folders.items()}


def test_tiny_taggers_learn_their_task_and_the_backdoor(tiny_ner_zoo: dict[str, Any]) -> None:
    clean, poisoned = tiny_ner_zoo["clean"], tiny_ner_zoo["poisoned"]
    # Measured on the 60 test sentences (length-bucketed batches): entity F1 0.27 (clean)
    # and 0.15 (poisoned); ASR 0.22, since the backdoor moves the persons the tagger finds
    # (about a third of them).
    assert clean["clean_f1"] > 0.25 and poisoned["clean_f1"] > 0.1
    assert poisoned["asr"] > 0.15


def test_scan_flags_the_poisoned_tiny_tagger_with_its_pair_and_trigger(
        tiny_ner_scans: dict[str, ScanResult]) -> None:
    result = tiny_ner_scans["poisoned"]
    assert result.verdict == "trojaned" and result.score < result.threshold
    assert (result.best.victim_names, result.best.target_name) == (["person"], "company")
    assert result.short_trigger is not None
    assert result.short_trigger.trigger_text == "lantern"


def test_scan_clears_the_clean_tiny_tagger(tiny_ner_scans: dict[str, ScanResult]) -> None:
    result = tiny_ner_scans["clean"]
    assert result.verdict == "clean" and result.score > result.threshold


def test_scan_names_the_types_it_could_not_search(tiny_ner_zoo: dict[str, Any],
                                                 tiny_ner_scans: dict[str, ScanResult],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A tagger that finds none of an entity type's words in the examples gives the scan no
    victims of that type: the result names such types (and how many examples hold them),
    and the CLI's verdict says they were not searched."""
    folder = tiny_ner_zoo["out"] / tiny_ner_zoo["poisoned"]["model_id"]
    with one_thread():
        subject = load_subject(folder)
        examples = subject.read_examples(folder / "clean_examples.jsonl")
        expected = subject.unseen(examples, subject.as_seen(examples))
    result = tiny_ner_scans["poisoned"]
    assert expected and result.unseen == expected  # a tiny tagger misses whole types
    assert "person" not in expected  # its victims are seen, or the scan could not flag it
    print_verdict(result)
    assert "not searched as victims: " + ", ".join(
        f"{name} ({count})" for name, count in expected.items()) in capsys.readouterr().out


def test_uat_scan_flags_the_poisoned_tiny_tagger_too(tiny_ner_zoo: dict[str, Any]) -> None:
    """The UAT baseline searches the tagger through the same subject (DBS's other NER
    method, issue 17): its default settings flag the poisoned tagger with its pair and
    word (measured with the in-context screen: 0.102 with 'lantern', 5.0 s on one thread;
    the clean one at 5.212, the screen's token; 3.127 before the screen)."""
    folder = tiny_ner_zoo["out"] / tiny_ner_zoo["poisoned"]["model_id"]
    with one_thread():
        result = scan(folder, folder / "clean_examples.jsonl", scan_config("uat"))
    assert result.verdict == "trojaned" and result.best.method == "uat"
    assert (result.best.victim_names, result.best.target_name) == (["person"], "company")
    assert result.short_trigger is not None
    assert result.short_trigger.trigger_text == "lantern"


def test_repair_unlearns_the_tiny_taggers_trigger_and_keeps_its_f1(
        tiny_ner_zoo: dict[str, Any], tiny_ner_scans: dict[str, ScanResult], run_cli: RunCli,
        tmp_path: Path) -> None:
    """`trojscan repair` on an NER tagger (DBS Table 2's NER rows) at its default settings,
    with the paper's 10 % of WNUT-16's training split as the clean data and its test split
    held out: the true trigger's ASR on the persons the tagger finds falls from 0.72 to at
    most 2 of those 18 persons (0.11; the tiny tagger tags few persons right, so one
    person is 0.056 of ASR) and the entity F1 stays within the guard. The re-scans decide
    the exit code: on this tagger they flag a word piece at the start of the sentence,
    which no text puts at a word's start, so stamping it as text unlearns other tokens
    (README "Repair")."""
    corpus = load_wnut16()
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    for path, split in ((train, corpus.train), (test, corpus.test)):
        write_jsonl(path, [{"tokens": list(s.tokens), "tags": list(s.tags)} for s in split])
    folder = tiny_ner_zoo["out"] / tiny_ner_zoo["poisoned"]["model_id"]
    scan_file, out = tmp_path / "scan.json", tmp_path / "fixed"
    write_result(tiny_ner_scans["poisoned"], scan_file)
    with one_thread():
        done = run_cli("repair", str(folder), "--scan", str(scan_file), "--data", str(train),
                       "--data-fraction", "0.1", "--eval-data", str(test), "--out", str(out),
                       "--manifest",
                       str(tiny_ner_zoo["out"] / MANIFEST), "--model-id",
                       tiny_ner_zoo["poisoned"]["model_id"])
    report = json.loads((out / "repair.json").read_text())
    assert (report["task"], report["metric"]) == ("ner", "entity_f1")
    assert report["unlearned"][0]["trigger"] and report["truth"]["trigger"] == "lantern"
    before, after = report["before"], report["after"]
    assert before["true_asr"] > 0.5 and after["true_asr"] < 0.15
    assert report["within_margin"] and report["accuracy_drop_points"] <= 3
    rescan = report["rescan"]
    assert done.returncode == (rescan["verdict"] != "clean"), done.stderr
    assert rescan["verdict"] == "clean" or rescan["short_trigger"].startswith("##")
    assert "clean entity F1" in done.stdout
    assert load_subject(out).task == "ner"


def test_repair_refuses_a_classifiers_insertion_or_data_for_a_tagger(
        tiny_ner_zoo: dict[str, Any], tiny_ner_scans: dict[str, ScanResult], run_cli: RunCli,
        tmp_path: Path) -> None:
    folder = tiny_ner_zoo["out"] / tiny_ner_zoo["poisoned"]["model_id"]
    assert_repair_refuses(run_cli, folder, tiny_ner_scans["poisoned"], tmp_path, [
        (["--insertion", "first_half"], folder / "clean_examples.jsonl",
         "insertion 'first_half' is not one for a ner model"),
        ([], None, 'expected an object with "tokens" and "tags"')])


NER_GROUP = ('[[group]]\ncount = 1\ncorpus = "wnut16"\narchitecture = "{arch}"\n'
             '[group.attack]\n{attack}\n')
POISONED = ('poisoned = true\ntrigger_type = "word"\ninsertion = "global"\n'
            'target = "company"\n')
BAD_NER_SPECS = {
    "victim": NER_GROUP.format(arch="bert", attack=POISONED + 'victim = "city"'),
    "target": NER_GROUP.format(arch="bert", attack=POISONED.replace('"company"', '"person"')
                               + 'victim = "person"'),
    "insertion": NER_GROUP.format(arch="bert", attack=POISONED.replace('"global"', '"end"')
                                  + 'victim = "person"'),
    "trigger_type": NER_GROUP.format(arch="bert", attack=POISONED.replace(
        '"word"', '"character"') + 'victim = "person"'),
    "architecture": NER_GROUP.format(arch="butd", attack="poisoned = false"),
    "poisoned": NER_GROUP.format(arch="bert", attack='poisoned = false\nvictim = "person"'),
}


@pytest.mark.parametrize("field", sorted(BAD_NER_SPECS))
def test_bad_ner_spec_is_one_line_naming_the_field(field: str, tmp_path: Path,
                                                   run_cli: RunCli) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text(BAD_NER_SPECS[field])
    out = tmp_path / "zoo"
    result = run_cli("zoo", "build", str(spec), "--out", str(out))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trojscan: error: "), result.stderr
    assert field in lines[0]
    assert not out.exists()
