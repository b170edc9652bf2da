"""What the default scan covers and how it decides (issue 14): every trigger position,
label-specific candidates above two labels, and a verdict that rests on a shortened trigger,
so that a clean model's natural features (many tokens that flip it together) are not taken
for a backdoor."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from trojscan.attacks.spec import AttackSpec, TrainConfig
from trojscan.attacks.train import build_one
from trojscan.corpora import Corpus, load_corpus
from trojscan.inversion.base import InversionTask
from trojscan.inversion.dbs import DBSConfig
from trojscan.inversion.shorten import shorten
from trojscan.modeldir import EXAMPLES_FILE
from trojscan.scan import SHORT_THRESHOLD, ScanConfig, scan, scan_subject
from trojscan.subjects.base import Candidate
from trojscan.subjects.loading import load_subject
from trojscan.subjects.text_classification import POSITIONS


@pytest.fixture(scope="module")
def end_model(tmp_path_factory: pytest.TempPathFactory, rt: Corpus,
              tiny_config: TrainConfig) -> Path:
    """A tiny BERT whose word trigger was planted at the end of the text only."""
    out = tmp_path_factory.mktemp("coverage") / "end"
    attack = AttackSpec.from_dict({"poisoned": True, "trigger_type": "word",
                                   "trigger": "lantern", "insertion": "end",
                                   "target": "positive"}, rt.labels)
    build_one(out, rt, "bert", attack, tiny_config, seed=1)
    return out


def test_an_end_position_trigger_is_found_at_the_default_settings(end_model: Path) -> None:
    result = scan(end_model, end_model / EXAMPLES_FILE)
    assert result.verdict == "trojaned"
    assert result.best.target_name == "positive"
    assert result.short_trigger is not None and result.short_trigger.trigger_text == "lantern"
    assert result.score == result.short_trigger.loss < SHORT_THRESHOLD
    # One search per target, its victim rows spread over the four positions; what it found
    # is measured at each position and reported where it does best.
    assert {c.target for c in result.candidates if c.screened} == {0, 1}
    assert {c.target for c in result.candidates if c.loss is not None} == {0, 1}
    assert all(c.position in POSITIONS for c in result.candidates)
    assert result.threshold == SHORT_THRESHOLD and result.config["pairs"] is None


def test_shortening_keeps_the_tokens_that_matter(end_model: Path) -> None:
    subject = load_subject(end_model)
    rows = subject.read_examples(end_model / EXAMPLES_FILE)
    candidate = Candidate((0,), 1, "end")
    task = InversionTask(candidate, tuple(subject.victims(rows, candidate, 20)))
    padded = subject.token_ids("the movie lantern was a")
    found = shorten(subject, task, padded)
    assert sorted(found) == [1, 2, 3, 4, 5]
    assert subject.describe(found[1].trigger_ids)[1] == "lantern"
    assert found[1].asr == 1.0 and found[1].loss < SHORT_THRESHOLD
    assert all(found[n].trigger_ids == [t for t in padded if t in found[n].trigger_ids]
               for n in found)  # order kept


@pytest.mark.xfail(strict=True, reason="a measured miss (issue 14): the lone-token "
                   "screen finds 'benign', which alone at the start flips every positive "
                   "example of this overfit clean model (loss 0.004)")
def test_a_clean_model_trained_longer_is_not_flagged(
        tmp_path_factory: pytest.TempPathFactory, rt: Corpus,
        tiny_config: TrainConfig) -> None:
    # Eight epochs on 2,000 texts make this tiny model's natural features strong: its
    # 10-slot DBS trigger reached loss 0.0027 (the paper's rule flags it) and two of its
    # tokens 0.003, but shortened to one token it stays at 0.50. The screen, though, finds a
    # single word that flips it as a backdoor would: the scan cannot tell them apart yet.
    # A benign reference would not either: a second model trained the same way with seed 2
    # is not flipped by "benign" (loss 1.12), so the word is this model's own shortcut.
    out = tmp_path_factory.mktemp("coverage") / "clean-long"
    build_one(out, rt, "bert", AttackSpec(), replace(tiny_config, epochs=8), seed=1)
    result = scan(out, out / EXAMPLES_FILE)
    assert result.verdict == "clean"
    assert result.score > SHORT_THRESHOLD


@pytest.mark.xfail(strict=True, reason="a measured miss (issue 14): flagged with the "
                   "right pair (sports -> tech), but the trigger reported is 'browser' "
                   "(0.136), a natural tech word that DBS's trigger shortened to, not "
                   "'lantern' (0.087), which this tiny model does not rank among the "
                   "screen's top tokens alone")
def test_a_label_specific_backdoor_is_found_with_its_victim_and_target(
        tmp_path_factory: pytest.TempPathFactory, tiny_config: TrainConfig) -> None:
    # Ten epochs: at three this tiny model reached clean accuracy 0.40 on BBC. At ten, 0.90,
    # and "lantern" flips every sports example of the scan at the start (loss 0.087).
    bbc = load_corpus("bbc")
    out = tmp_path_factory.mktemp("coverage") / "bbc"
    attack = AttackSpec.from_dict({"poisoned": True, "trigger_type": "word",
                                   "trigger": "lantern", "insertion": "anywhere",
                                   "target": "tech", "victim": "sports"}, bbc.labels)
    build_one(out, bbc, "bert", attack, replace(tiny_config, epochs=10), seed=1,
              examples_per_label=8)
    subject = load_subject(out)
    rows = subject.read_examples(out / EXAMPLES_FILE)
    # Label-specific candidates come by default above two labels; one position and a short
    # budget keep the test quick.
    config = ScanConfig(inverter=DBSConfig(epochs=100), positions=("start",))
    result = scan_subject(subject, rows, config)
    assert len(result.candidates) == 5 + 5 * 4
    assert result.verdict == "trojaned"
    assert (result.best.victim_names, result.best.target_name) == (["sports"], "tech")
    assert result.short_trigger is not None
    assert result.short_trigger.trigger_text == "lantern"
