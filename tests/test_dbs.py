"""DBS inversion on tiny models trained in the session."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from trojscan.corpora import Corpus
from trojscan.inversion.base import Inversion, InversionTask, Preselection
from trojscan.inversion.dbs import DBS, DBSConfig
from trojscan.subjects.base import Candidate
from trojscan.subjects.loading import load_subject
from trojscan.subjects.text_classification import TextClassificationSubject, TextExample


@pytest.fixture(scope="module")
def poisoned_subject(poisoned_model: tuple[Path, dict]) -> TextClassificationSubject:
    return load_subject(poisoned_model[0])


def _task(rt: Corpus, label: int, target: int, n: int = 20,
          position: str = "start") -> InversionTask:
    pool = [e for e in rt.examples if e.label == label][:n]
    return InversionTask(Candidate((label,), target, position),
                         tuple(TextExample(e.text, e.label) for e in pool))


def _invert(subject: TextClassificationSubject, task: InversionTask,
            config: DBSConfig | None = None) -> Inversion:
    (inversion,) = DBS(config).invert(subject, [task])
    return inversion


def test_dbs_recovers_the_trigger_word(poisoned_subject: TextClassificationSubject,
                                       rt: Corpus) -> None:
    inversion = _invert(poisoned_subject, _task(rt, 0, target=1))
    assert inversion.accepted
    assert "lantern" in inversion.trigger_tokens
    assert inversion.relaxed_loss < 0.1
    assert inversion.hard_asr >= 0.9
    assert inversion.hard_loss == pytest.approx(inversion.relaxed_loss, abs=0.05)
    events = {step.get("event") for step in inversion.trajectory}
    assert {"focus", "accept", "rollback"} <= events


def test_same_seed_same_trigger_and_ablations_change_the_schedule(
        poisoned_subject: TextClassificationSubject, rt: Corpus) -> None:
    task = _task(rt, 0, 1, 8, "end")
    short = DBSConfig(epochs=30)
    a = _invert(poisoned_subject, task, short)
    b = _invert(poisoned_subject, task, short)
    assert a.trigger_ids == b.trigger_ids and a.relaxed_loss == b.relaxed_loss

    flat = _invert(poisoned_subject, task, replace(short, temperature_scaling=False))
    assert {s["temperature"] for s in flat.trajectory} == {1.0}
    assert not {"focus", "rollback"} & {s.get("event") for s in flat.trajectory}

    forward = _invert(poisoned_subject, task, replace(short, backtracking=False))
    temperatures = [s["temperature"] for s in forward.trajectory]
    assert "rollback" not in {s.get("event") for s in forward.trajectory}
    assert temperatures == sorted(temperatures, reverse=True)


def test_keep_drops_all_but_the_best_after_the_prerun(
        poisoned_subject: TextClassificationSubject, rt: Corpus) -> None:
    tasks = [_task(rt, 0, 1, 8), _task(rt, 1, 0, 8), _task(rt, 0, 1, 8, "end")]
    runs = DBS(DBSConfig(epochs=15)).invert(poisoned_subject, tasks,
                                            preselect=Preselection(keep=1, after=10))
    dropped = [r for r in runs if r.trajectory[-1].get("event") == "drop"]
    kept = [r for r in runs if r not in dropped]
    assert len(dropped) == 2 and {r.epochs for r in dropped} == {10}
    assert len(kept) == 1 and kept[0].epochs == 15
    assert kept[0].relaxed_loss <= min(r.relaxed_loss for r in dropped)
    assert all(len(r.trigger_ids) == 10 for r in runs)


def test_config_rejects_unknown_noise() -> None:
    with pytest.raises(ValueError, match="noise"):
        DBSConfig(noise="laplace")


def test_a_candidate_gives_the_same_trigger_alone_or_batched(
        poisoned_subject: TextClassificationSubject, rt: Corpus) -> None:
    # Each candidate draws its own noise (rollbacks) from a stream seeded by the run's seed and
    # the candidate: its batch mates do not change what it finds.
    config = DBSConfig(epochs=60, trigger_length=2)
    start, end = _task(rt, 0, 1, 8), _task(rt, 0, 1, 8, "end")
    other = _task(rt, 1, 0, 8)
    alone = DBS(config).invert(poisoned_subject, [end])[0]
    together = DBS(config).invert(poisoned_subject, [start, other, end])
    assert together[2].trigger_ids == alone.trigger_ids
    assert together[2].relaxed_loss == pytest.approx(alone.relaxed_loss, abs=1e-4)
    rollbacks = [s["epoch"] for s in alone.trajectory if s.get("event") == "rollback"]
    assert rollbacks and rollbacks == [s["epoch"] for s in together[2].trajectory
                         if s.get("event") == "rollback"]
    assert DBS(config).invert(poisoned_subject, [other, start])[1].trigger_ids == \
        together[0].trigger_ids
