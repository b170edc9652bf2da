"""DBS inversion on tiny models trained in the session."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from trojscan.corpora import Corpus
from trojscan.inversion.dbs import DBSConfig, InversionTask, invert, invert_many
from trojscan.subjects.loading import load_subject
from trojscan.subjects.text import TextSubject


@pytest.fixture(scope="module")
def poisoned_subject(poisoned_model: tuple[Path, dict]) -> TextSubject:
    return load_subject(poisoned_model[0])


def _victims(rt: Corpus, label: int, n: int = 20) -> tuple[list[str], list[int]]:
    pool = [e for e in rt.examples if e.label == label][:n]
    return [e.text for e in pool], [e.label for e in pool]


def test_dbs_recovers_the_trigger_word(poisoned_subject: TextSubject, rt: Corpus) -> None:
    texts, labels = _victims(rt, 0)
    inversion = invert(poisoned_subject, texts, labels, target=1)
    assert inversion.accepted
    assert "lantern" in inversion.trigger_tokens
    assert inversion.relaxed_loss < 0.1
    assert inversion.hard_asr >= 0.9
    assert inversion.hard_loss == pytest.approx(inversion.relaxed_loss, abs=0.05)
    events = {step.get("event") for step in inversion.trajectory}
    assert {"focus", "accept", "rollback"} <= events


def test_same_seed_same_trigger_and_ablations_change_the_schedule(
        poisoned_subject: TextSubject, rt: Corpus) -> None:
    texts, labels = _victims(rt, 0, 8)
    short = DBSConfig(epochs=30)
    a = invert(poisoned_subject, texts, labels, 1, "end", short)
    b = invert(poisoned_subject, texts, labels, 1, "end", short)
    assert a.trigger_ids == b.trigger_ids and a.relaxed_loss == b.relaxed_loss

    flat = invert(poisoned_subject, texts, labels, 1, "end",
                  replace(short, temperature_scaling=False))
    assert {s["temperature"] for s in flat.trajectory} == {1.0}
    assert not {"focus", "rollback"} & {s.get("event") for s in flat.trajectory}

    forward = invert(poisoned_subject, texts, labels, 1, "end", replace(short, backtracking=False))
    temperatures = [s["temperature"] for s in forward.trajectory]
    assert "rollback" not in {s.get("event") for s in forward.trajectory}
    assert temperatures == sorted(temperatures, reverse=True)


def test_keep_drops_all_but_the_best_after_the_prerun(poisoned_subject: TextSubject,
                                                      rt: Corpus) -> None:
    negative, positive = _victims(rt, 0, 8), _victims(rt, 1, 8)
    tasks = [InversionTask(*negative, target=1), InversionTask(*positive, target=0),
             InversionTask(*negative, target=1, position="end")]
    runs = invert_many(poisoned_subject, tasks, DBSConfig(epochs=15), keep=1, keep_after=10)
    dropped = [r for r in runs if r.trajectory[-1].get("event") == "drop"]
    kept = [r for r in runs if r not in dropped]
    assert len(dropped) == 2 and {r.epochs for r in dropped} == {10}
    assert len(kept) == 1 and kept[0].epochs == 15
    assert kept[0].relaxed_loss <= min(r.relaxed_loss for r in dropped)
    assert all(len(r.trigger_ids) == 10 for r in runs)


def test_config_rejects_unknown_noise() -> None:
    with pytest.raises(ValueError, match="noise"):
        DBSConfig(noise="laplace")
