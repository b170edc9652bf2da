"""The baseline inverters (UAT, ASCC, genetic search, T-Miner) on the tiny poisoned model.

Each runs on 10 negative reviews towards "positive", the direction of the planted trigger
word, with a reduced budget where its default is expensive (said at each test), and must stay
within its configured evaluation budget.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trojscan.corpora import Corpus
from trojscan.inversion import ascc, genetic, tminer, uat
from trojscan.inversion.base import (
    METHODS,
    VARIANTS,
    Inversion,
    InversionTask,
    Preselection,
    make_config,
    method_names,
    method_of,
)
from trojscan.inversion.common import Progress
from trojscan.inversion.dbs import DBSConfig
from trojscan.subjects.base import Candidate
from trojscan.subjects.loading import load_subject
from trojscan.subjects.text_classification import TextClassificationSubject, TextExample

TRIGGER = "lantern"


@pytest.fixture(scope="module")
def subject(poisoned_model: tuple[Path, dict]) -> TextClassificationSubject:
    return load_subject(poisoned_model[0])


@pytest.fixture(scope="module")
def task(rt: Corpus) -> InversionTask:
    pool = [e for e in rt.examples if e.label == 0][:10]
    return InversionTask(Candidate((0,), 1, "start"),
                         tuple(TextExample(e.text, e.label) for e in pool))


def _evaluations(inversion: Inversion) -> int:
    """The total evaluation count (the trajectory's final entry), after checking that the
    running counts never go down."""
    counts = [step["evaluations"] for step in inversion.trajectory]
    assert counts == sorted(counts)
    assert inversion.trajectory[-1]["event"] == "final"
    return counts[-1]


def test_uat_recovers_the_trigger_word(subject: TextClassificationSubject,
                                       task: InversionTask) -> None:
    # An iteration costs 1 + 10 slots x top-1 = 11 evaluations; a cap of 25 leaves room for
    # two and the final measurement. HotFlip puts the trigger word in within the first.
    config = uat.UATConfig(max_evaluations=25)
    (inversion,) = uat.UAT(config).invert(subject, [task])
    assert inversion.method == "uat" and inversion.accepted
    assert TRIGGER in inversion.trigger_tokens
    assert inversion.hard_asr >= 0.9
    assert inversion.relaxed_loss == inversion.hard_loss == inversion.loss
    assert inversion.epochs == 2
    assert _evaluations(inversion) == 2 * config.per_iteration() + 1 <= 25


def test_uat_stops_when_an_iteration_changes_nothing(subject: TextClassificationSubject,
                                                     task: InversionTask) -> None:
    # All victims in every step make the search deterministic: once the trigger is stable the
    # next iteration would repeat it, so the search ends.
    (inversion,) = uat.UAT(uat.UATConfig(epochs=50)).invert(subject, [task])
    assert inversion.trajectory[-2].get("event") == "converged"
    assert inversion.epochs < 50
    losses = [step["loss"] for step in inversion.trajectory[:-1]]
    assert losses == sorted(losses, reverse=True)


def test_uat_minibatches_are_seeded_and_never_stop_early(subject: TextClassificationSubject,
                                                         task: InversionTask) -> None:
    config = uat.UATConfig(epochs=3, batch_size=4, seed=3)
    (inversion,) = uat.UAT(config).invert(subject, [task])
    assert inversion.epochs == 3
    assert _evaluations(inversion) == 3 * config.per_iteration() + 1
    assert uat.UAT(config).invert(subject, [task])[0].trigger_ids == inversion.trigger_ids


def test_ascc_recovers_the_trigger_word(subject: TextClassificationSubject,
                                        task: InversionTask) -> None:
    # 40 of the default 200 epochs: the argmax holds the word from about epoch 30, but the
    # entropy term takes ~1 nat per epoch off the summed entropy (103 nats at the start), so
    # the trigger is not yet one-hot (measured: it is, and accepted, at the default 200).
    config = ascc.ASCCConfig(epochs=40, max_evaluations=41)
    (inversion,) = ascc.ASCC(config).invert(subject, [task])
    assert inversion.method == "ascc"
    assert TRIGGER in inversion.trigger_tokens
    assert inversion.hard_asr >= 0.9
    assert not inversion.accepted and inversion.loss == inversion.hard_loss
    entropy = [step["entropy"] for step in inversion.trajectory[:-1]]
    assert entropy == sorted(entropy, reverse=True)
    assert _evaluations(inversion) == 41


def test_ascc_stops_at_its_budget(subject: TextClassificationSubject,
                                  task: InversionTask) -> None:
    (inversion,) = ascc.ASCC(ascc.ASCCConfig(max_evaluations=6)).invert(subject, [task])
    assert inversion.epochs == 5 and _evaluations(inversion) == 6
    assert inversion.relaxed_loss == inversion.trajectory[-2]["loss"]


def test_genetic_search_does_not_find_the_word_but_flips_the_victims(
        subject: TextClassificationSubject, task: InversionTask) -> None:
    # Measured behaviour, pinned: the genetic search draws tokens uniformly from ~30,500, so
    # it holds the trigger word only by luck (at the paper's settings, 300 x 10 random tokens
    # and ~1,350 mutations, about 1 run in 7; at this test's reduced budget, population 40
    # and 4 generations, about 1 in 60). On this easily flipped tiny model it still finds
    # junk triggers that flip the victims; at the paper's settings (seed 0, 20 victims) its
    # best was 10 junk tokens with loss 0.053 and ASR 1.0, where DBS, UAT and ASCC find the
    # word with loss 0.051.
    config = genetic.GeneticConfig(population=40, epochs=4, max_evaluations=40 + 3 * 39 + 1)
    (inversion,) = genetic.Genetic(config).invert(subject, [task])
    assert inversion.method == "genetic" and inversion.accepted
    assert TRIGGER not in inversion.trigger_tokens
    best = [step["loss"] for step in inversion.trajectory[:-1]]
    assert best == sorted(best, reverse=True) and best[-1] < best[0]  # elitism: never worse
    assert inversion.hard_loss == pytest.approx(best[-1], abs=1e-4)
    assert inversion.epochs == 4
    assert _evaluations(inversion) == config.max_evaluations
    again = genetic.Genetic(config).invert(subject, [task])[0]
    assert again.trigger_ids == inversion.trigger_ids  # seeded
    other = genetic.Genetic(genetic.GeneticConfig(population=40, epochs=1, seed=1)).invert(
        subject, [task])[0]
    assert other.trigger_ids != inversion.trigger_ids


def test_genetic_search_stops_at_its_budget(subject: TextClassificationSubject,
                                            task: InversionTask) -> None:
    # Generation 0 (20) and the final measurement (1) fit 30; a second generation (19) does not.
    config = genetic.GeneticConfig(population=20, max_evaluations=30)
    (inversion,) = genetic.Genetic(config).invert(subject, [task])
    assert inversion.epochs == 1 and _evaluations(inversion) == 21


def test_tminer_recovers_the_trigger_word(subject: TextClassificationSubject,
                                          task: InversionTask) -> None:
    # Reduced from the defaults (20 + 200 steps over 16 tokens of each victim) to 15 + 120
    # steps over 6 tokens, to keep the CPU time small. Whether the greedy rewrite puts the
    # word into the victims depends on the generator's training, which floating-point
    # summation order (thread count, machine load) can tip where it is close. Measured on this
    # model (victims the word went into, at 1 / 2 / 3 threads): seed 0: 3 / 0 / 3 (found only
    # through the probability mass at 2 threads; "amazing", ASR 0.7, went into 9-10), seed 1:
    # 10 / 10 / 10, seed 2: 10 / 10 / 10, seed 4: not found at all. Seed 1 is far from the
    # edge, so the test does not hang on the summation order.
    config = tminer.TMinerConfig(pretrain_epochs=15, epochs=120, seq_len=6, trigger_length=5,
                                 max_evaluations=130, seed=1)
    (inversion,) = tminer.TMiner(config).invert(subject, [task])
    assert inversion.method == "tminer" and inversion.accepted
    found = inversion.trajectory[-2]
    assert found["event"] == "candidates" and found["rewritten"] >= 1
    best = found["candidates"][0]
    assert best["token"] == TRIGGER and best["asr"] >= 0.9 and best["inserted_into"] >= 8
    assert len(found["candidates"]) == 5 and inversion.trigger_tokens[0] == TRIGGER
    assert inversion.hard_asr >= 0.9
    assert inversion.epochs == 120
    assert _evaluations(inversion) == 120 + 5 + 1
    (again,) = tminer.TMiner(config).invert(subject, [task])
    assert again.trigger_ids == inversion.trigger_ids  # seeded


def test_progress_reports_each_epoch_once_in_order() -> None:
    seen: list[int] = []
    progress = Progress(seen.append, tasks=2, epochs=5)
    for epoch in range(5):
        progress(0, epoch)
    assert seen == [0, 1]
    progress(1, 0)
    progress.task_done(1)  # the second task stopped early
    assert seen == [0, 1, 2, 3, 4]


BAD_CONFIGS: list[tuple[Callable[..., Any], dict[str, Any], str]] = [
    (uat.UATConfig, {"top_k": 0}, "top_k"),
    (uat.UATConfig, {"beam_width": 0}, "beam_width"),
    (uat.UATConfig, {"batch_size": -1}, "batch_size"),
    (uat.UATConfig, {"max_evaluations": 0}, "max_evaluations"),
    (ascc.ASCCConfig, {"sparsity_weight": -1}, "sparsity_weight"),
    (ascc.ASCCConfig, {"lr_decay": 0}, "lr_decay"),
    (ascc.ASCCConfig, {"epochs": 0}, "epochs"),
    (genetic.GeneticConfig, {"population": 1}, "population"),
    (genetic.GeneticConfig, {"mutation_rate": 1.5}, "mutation_rate"),
    (genetic.GeneticConfig, {"selection_temperature": 0}, "selection_temperature"),
    (genetic.GeneticConfig, {"population": 10, "max_evaluations": 10}, "max_evaluations"),
    (tminer.TMinerConfig, {"seq_len": 0}, "seq_len"),
    (tminer.TMinerConfig, {"gumbel_temperature": 0}, "gumbel_temperature"),
    (tminer.TMinerConfig, {"diversity_weight": -0.1}, "weights"),
    (tminer.TMinerConfig, {"trigger_length": 4, "max_evaluations": 4}, "max_evaluations"),
]


@pytest.mark.parametrize(("cls", "kwargs", "match"), BAD_CONFIGS)
def test_configs_reject_bad_values(cls: Callable[..., Any], kwargs: dict[str, Any],
                                   match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_uat_rejects_an_initial_token_that_is_not_one_token(subject: TextClassificationSubject,
                                                            task: InversionTask) -> None:
    with pytest.raises(ValueError, match="initial_token"):
        uat.UAT(uat.UATConfig(initial_token="[SEP]")).invert(subject, [task])


def test_make_config_builds_every_method_from_the_common_options() -> None:
    assert method_names() == ["dbs", "dbs-fixed-temperature", "dbs-no-backtracking", "uat",
                              "gcg", "ascc", "genetic", "tminer", "tijo", "tijo-nlp",
                              "tijo-vis", "tijo-one", "tijo-relaxed"]
    assert set(METHODS) == {"dbs", "uat", "gcg", "ascc", "genetic", "tminer", "tijo"}
    assert {name: method for name, (method, _) in VARIANTS.items()} == {
        "dbs-fixed-temperature": "dbs", "dbs-no-backtracking": "dbs", "tijo-nlp": "tijo",
        "tijo-vis": "tijo", "tijo-one": "tijo", "tijo-relaxed": "tijo"}
    for name in method_names():
        config = make_config(name, trigger_length=3, epochs=7, seed=5)
        assert isinstance(config, method_of(name).config_class)
        assert (config.trigger_length, config.epochs) == (3, 7)
        assert getattr(config, "seed", 5) == 5  # ascc draws no random numbers: no seed
        assert config.to_dict()["epochs"] == 7
    assert make_config("dbs") == DBSConfig()
    assert make_config("dbs-fixed-temperature") == DBSConfig(temperature_scaling=False)
    assert make_config("dbs-no-backtracking", epochs=9) == DBSConfig(backtracking=False, epochs=9)
    assert make_config("uat", top_k=4).top_k == 4
    assert make_config("genetic", max_evaluations=500).max_evaluations == 500
    with pytest.raises(ValueError, match="unknown inversion method"):
        make_config("nope")
    with pytest.raises(ValueError, match="dbs has no option max_evaluations"):
        make_config("dbs", max_evaluations=10)
    with pytest.raises(ValueError, match="mutation_rate"):
        make_config("genetic", mutation_rate=2)


def test_one_by_one_inverters_refuse_a_preselection(subject: TextClassificationSubject,
                                                    task: InversionTask) -> None:
    with pytest.raises(ValueError, match="cannot pre-select"):
        uat.UAT().invert(subject, [task, task], preselect=Preselection(keep=1, after=5))
