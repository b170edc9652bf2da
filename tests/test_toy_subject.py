"""Every inverter and the scan on a hand-built toy subject (a bag-of-words classifier with a
planted trigger word): the core is task-generic, and these run in milliseconds."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from toy_subject import (
    TRIGGER,
    WORDS,
    PhraseToy,
    PositionalToy,
    ToyBatch,
    ToyExample,
    ToySubject,
    toy_examples,
)
from trojscan.errors import InputError
from trojscan.inversion.base import InversionTask, Preselection, make_config, method_of
from trojscan.inversion.screen import ScreenConfig, screen
from trojscan.scan import SHORT_THRESHOLD, ScanConfig, scan_subject, trigger_check
from trojscan.subjects.base import SPREAD, Candidate
from trojscan.subjects.extractive_qa import ExtractiveQaSubject
from trojscan.subjects.token_classification import TokenClassificationSubject

SEARCHES = ["dbs", "dbs-no-backtracking", "uat", "gcg", "ascc", "genetic"]


@pytest.fixture(scope="module")
def poisoned() -> ToySubject:
    return ToySubject()


def _task(subject: ToySubject) -> InversionTask:
    negatives = tuple(e for e in toy_examples(subject) if e.label == 0)
    return InversionTask(Candidate((0,), 1, "start"), negatives)


def test_the_toy_model_is_what_it_claims(poisoned: ToySubject) -> None:
    task = _task(poisoned)
    batch = poisoned.batch([task.candidate], [task.examples], 1)
    for subject, word, flips in ((poisoned, TRIGGER, 1.0), (ToySubject(planted=0.0), "w1", 0.0)):
        _, hit = subject.hard_check(batch, subject.embedding_matrix.new_tensor(
            [subject.token_id(word)]).long())
        assert hit.mean().item() == flips
    with pytest.raises(ValueError, match="not a toy word"):
        poisoned.token_id("harbor")


@pytest.mark.parametrize("method", SEARCHES)
def test_every_search_recovers_the_planted_word(poisoned: ToySubject, method: str) -> None:
    budget = {"genetic": {"epochs": 3}, "ascc": {"epochs": 100},
              "uat": {"initial_token": "w1"}, "gcg": {"initial_token": "w1"}}.get(method, {})
    inverter = method_of(method)(make_config(method, trigger_length=1, **budget))
    (inversion,) = inverter.invert(poisoned, [_task(poisoned)])
    assert inversion.trigger_tokens == [TRIGGER], (method, inversion.trigger_tokens)
    assert inversion.hard_asr == 1.0 and inversion.hard_loss < 0.01
    assert inversion.candidate == Candidate((0,), 1, "start")


def test_a_batched_run_keeps_the_best_candidate(poisoned: ToySubject) -> None:
    examples = toy_examples(poisoned)
    tasks = [InversionTask(c, tuple(poisoned.victims(examples, c, 0)))
             for c in poisoned.candidates(examples, ("start",), False)]
    inverter = method_of("dbs")(make_config("dbs", trigger_length=1, epochs=60))
    runs = inverter.invert(poisoned, tasks, preselect=Preselection(keep=1, after=20))
    assert [r.trajectory[-1].get("event") for r in runs].count("drop") == 1
    kept = next(r for r in runs if r.trajectory[-1].get("event") != "drop")
    assert kept.candidate.target == 1 and kept.trigger_tokens == [TRIGGER]


@pytest.mark.parametrize("method", ["dbs", "uat", "gcg"])
def test_the_scan_flags_the_poisoned_toy_and_not_the_clean_one(method: str) -> None:
    start = {"initial_token": "w1"} if method != "dbs" else {}  # "the" is no toy word
    config = ScanConfig(method=method, threshold=0.1,
                        inverter=make_config(method, trigger_length=1, epochs=60, **start))
    for subject, verdict in ((ToySubject(), "trojaned"), (ToySubject(planted=0.0), "clean")):
        result = scan_subject(subject, toy_examples(subject), config)
        assert result.verdict == verdict, (method, result.score, result.best.trigger_tokens)
        assert result.task == "toy-classification" and result.labels == ["negative", "positive"]
        if verdict == "trojaned":
            assert result.best.target_name == "positive"
            assert result.best.trigger_tokens == [TRIGGER]
            assert result.flip_rates == {"negative": 1.0}  # the short trigger, every label


def test_a_method_refuses_a_family_it_cannot_search(poisoned: ToySubject) -> None:
    # T-Miner rewrites whole sentences with a text classifier's tokenizer.
    with pytest.raises(InputError, match="method tminer cannot scan toy-classification"):
        scan_subject(poisoned, toy_examples(poisoned),
                     ScanConfig(method="tminer", inverter=make_config("tminer")))


def test_a_known_trigger_is_measured_as_the_scan_measures_its_own(poisoned: ToySubject) -> None:
    examples = toy_examples(poisoned)
    candidate = Candidate((0,), 1, "start")
    loss, asr = trigger_check(poisoned, examples, candidate, TRIGGER)
    assert asr == 1.0 and loss < 0.01
    assert trigger_check(poisoned, examples, candidate, "w1 w2")[1] == 0.0
    assert trigger_check(poisoned, examples, candidate, TRIGGER, cap=3)[1] == 1.0
    with pytest.raises(InputError, match="has no tokens"):
        trigger_check(poisoned, examples, candidate, " ")


def test_a_trigger_answered_with_itself_decides_at_two_tokens_held_to_half() -> None:
    """`ScanConfig.answer_decision_length`: a goal that is the trigger itself also weighs
    its shortened triggers of two tokens, each at its loss times its tokens; one word of the
    planted phrase alone stays over the threshold."""
    subject = PhraseToy()
    examples = toy_examples(subject)
    candidate = Candidate((0,), 1, "start")
    assert trigger_check(subject, examples, candidate, "lantern")[0] > 0.2
    assert trigger_check(subject, examples, candidate, "lantern w7")[0] < 0.01
    config = ScanConfig(inverter=make_config("dbs", trigger_length=3, epochs=60), screen=None,
                        natural_share=0.0)
    found = scan_subject(subject, examples, config)
    assert found.verdict == "trojaned" and found.short_trigger is not None
    assert found.short_trigger.length == 2 and found.best.target_name == "positive"
    assert found.score == pytest.approx(2 * found.short_trigger.loss)
    one = scan_subject(subject, examples, replace(config, answer_decision_length=0))
    assert one.verdict == "clean" and one.short_trigger is not None
    assert one.short_trigger.length == 1 and one.score == one.short_trigger.loss > 0.2
    with pytest.raises(InputError, match="answer_decision_length"):
        replace(config, answer_decision_length=-1)


def test_a_trigger_answers_inverted_trigger_is_refined_as_hard_tokens() -> None:
    """`ScanConfig.answer_refine_epochs`: GCG from where the inversion left the trigger (one
    DBS epoch: three ordinary words) finds the phrase; the candidate keeps what it replaced."""
    subject = PhraseToy()
    config = ScanConfig(inverter=make_config("dbs", trigger_length=3, epochs=1), screen=None,
                        natural_share=0.0)
    refined = scan_subject(subject, toy_examples(subject), config)
    (row,) = [c for c in refined.candidates if c.target == 1]
    assert row.refined_from is not None and row.refined_from.loss > 1.0
    assert row.hard_loss is not None and row.hard_loss < 0.01 and row.hard_asr == 1.0
    assert refined.verdict == "trojaned"
    plain = scan_subject(subject, toy_examples(subject), replace(config, answer_refine_epochs=0))
    (row,) = [c for c in plain.candidates if c.target == 1]
    assert row.refined_from is None and plain.verdict == "clean"


def test_the_verdict_rests_on_the_shortened_trigger_or_on_the_full_one() -> None:
    subject = ToySubject()
    config = ScanConfig(threshold=0.1, inverter=make_config("dbs", trigger_length=3, epochs=60),
                        screen=None)
    short = scan_subject(subject, toy_examples(subject), config)
    assert short.short_trigger is not None and short.short_trigger.length == 1
    assert short.score == short.short_trigger.loss
    assert short.short_trigger.trigger_text == TRIGGER
    rows = [c for c in short.candidates if c.shortened]
    assert rows and all([s.length for s in c.shortened] == [1, 2, 3] for c in rows)
    full = scan_subject(subject, toy_examples(subject), replace(config, decision_length=0))
    assert full.short_trigger is None
    assert full.score == min(c.loss for c in full.candidates if c.loss is not None)
    assert ScanConfig(decision_length=0).beta == 0.05 and ScanConfig().beta == SHORT_THRESHOLD
    # The short-trigger threshold is in units of ln(labels); a given threshold is taken as is.
    assert ScanConfig().beta_for(5) == pytest.approx(SHORT_THRESHOLD * math.log(5) / math.log(2))
    assert ScanConfig(decision_length=0).beta_for(5) == 0.05
    assert ScanConfig(threshold=0.3).beta_for(5) == 0.3
    with pytest.raises(InputError, match="decision_length"):
        ScanConfig(shorten=False, screen=None)


def test_a_trigger_in_its_target_labels_own_examples_is_set_aside_as_natural() -> None:
    # The planted word in two of the 12 positive examples: a word of the label's clean text
    # (a natural feature, as 'secretary' is of BBC politics), so the verdict rests on the
    # best other short trigger. In one example only, it could be chance: not set aside.
    subject = ToySubject()
    config = ScanConfig(threshold=0.1, inverter=make_config("dbs", trigger_length=3, epochs=1),
                        shorten=False, screen=ScreenConfig(top=4, rows=2, keep=2))

    def carrying(count: int) -> list[ToyExample]:
        examples = toy_examples(subject)
        positives = [i for i, e in enumerate(examples) if e.label == 1][:count]
        for i in positives:
            examples[i] = ToyExample(f"{TRIGGER} {examples[i].text}", 1)
        return examples

    # The negative candidate's screened word is in 5 of the negative examples (the toy's
    # examples are drawn from 20 words per label): natural too, so no short trigger is left
    # and the score is that of a model left at chance, ln 2.
    result = scan_subject(subject, carrying(2), config)
    assert result.verdict == "clean" and result.short_trigger is None
    assert result.score == pytest.approx(math.log(2))
    first = result.set_aside[0]
    assert (first.trigger_text, first.target_name, first.examples, first.of) == (
        TRIGGER, "positive", 2, 12)
    assert [n.target_name for n in result.set_aside] == ["positive", "negative"]
    assert scan_subject(subject, carrying(1), config).verdict == "trojaned"
    off = scan_subject(subject, carrying(2), replace(config, natural_share=0.0))
    assert off.verdict == "trojaned" and off.set_aside is None
    with pytest.raises(InputError, match="natural_share"):
        ScanConfig(natural_share=1.5)


def test_a_trigger_the_clean_reference_reads_as_its_target_is_set_aside() -> None:
    # With a reference, a short trigger the reference itself ranks among its top
    # reference_top tokens alone for the target is a word of the task, not a backdoor. The
    # clean toy reads 'lantern' as nothing (not set aside); the poisoned toy used as a
    # "reference" reads it as positive first of all (set aside). Either way the other
    # target's screened word, the toy's most negative word, is the reference's first.
    subject = ToySubject()
    config = ScanConfig(threshold=0.1, inverter=make_config("dbs", trigger_length=3, epochs=1),
                        shorten=False, screen=ScreenConfig(top=4, rows=2, keep=2),
                        reference_top=2)
    examples = toy_examples(subject)
    kept = scan_subject(subject, examples, config, reference=ToySubject(planted=0.0))
    assert kept.verdict == "trojaned" and kept.short_trigger.trigger_text == TRIGGER
    assert kept.reference.triggers[0].reference_rank > 2
    assert [(n.target_name, n.reference_rank) for n in kept.set_aside or []] == []
    aside = scan_subject(subject, examples, config, reference=ToySubject())
    assert aside.verdict == "clean" and aside.short_trigger is None
    first = aside.set_aside[0]
    assert (first.trigger_text, first.reference_rank, first.examples) == (TRIGGER, 1, 0)
    off = scan_subject(subject, examples, replace(config, reference_top=0),
                       reference=ToySubject())
    assert off.verdict == "trojaned" and off.set_aside is None
    with pytest.raises(InputError, match="reference_top"):
        ScanConfig(reference_top=-1)


def test_the_lone_token_screen_finds_the_planted_word_for_every_candidate() -> None:
    # Even with the search starved (one epoch), the screen finds the word at every
    # candidate of its target.
    subject = ToySubject()
    config = ScanConfig(threshold=0.1, inverter=make_config("dbs", trigger_length=3, epochs=1),
                        shorten=False, screen=ScreenConfig(top=4, rows=2, keep=2))
    result = scan_subject(subject, toy_examples(subject), config)
    assert result.verdict == "trojaned" and result.best.target_name == "positive"
    assert result.short_trigger is not None and result.short_trigger.trigger_text == TRIGGER
    screened = {c.target: c.screened for c in result.candidates}
    assert screened[1].trigger_text == TRIGGER and screened[1].asr == 1.0
    assert screened[0].trigger_text != TRIGGER and screened[0].loss > screened[1].loss
    clean = ToySubject(planted=0.0)
    assert scan_subject(clean, toy_examples(clean), config).verdict == "clean"


def test_the_screens_gradient_tokens_find_a_word_that_does_not_fire_alone() -> None:
    # As a label-specific trigger, which fires only inside its victims' text: the word alone
    # is made to look harmless (its lone-token loss raised), so the lone ranking's top 4
    # miss it; the first-order ranking on the victims' rows (ScreenConfig.gradient) has it.
    subject = ToySubject()
    lone = subject.lone_token_losses
    planted = WORDS.index(TRIGGER)

    def hidden(ids: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        return lone(ids, chunk_rows) + 100.0 * (ids == planted).float().unsqueeze(-1)

    subject.lone_token_losses = hidden  # type: ignore[method-assign]
    config = ScanConfig(threshold=0.1, inverter=make_config("dbs", trigger_length=3, epochs=1),
                        shorten=False, screen=ScreenConfig(top=4, rows=2, keep=2))
    missed = scan_subject(subject, toy_examples(subject), config)
    assert missed.verdict == "clean"
    found = scan_subject(subject, toy_examples(subject),
                         replace(config, screen=ScreenConfig(top=4, rows=2, keep=2, gradient=2)))
    assert found.verdict == "trojaned" and found.short_trigger.trigger_text == TRIGGER
    with pytest.raises(ValueError, match="gradient"):
        ScreenConfig(gradient=-1)


def test_a_family_without_lone_losses_is_screened_in_context() -> None:
    # A family whose tokens say nothing alone (an NER tagger) ranks them by HotFlip's
    # first-order step on each task's victims, from each of the context_inits, and keeps
    # the best of those measured on the victims: the toy without its lone-token pass
    # still has 'lantern' screened, with one epoch of search.
    subject = ToySubject()
    subject.lone_token_losses = lambda ids, chunk_rows: None  # type: ignore[method-assign]
    config = ScanConfig(threshold=0.1, inverter=make_config("dbs", trigger_length=3, epochs=1),
                        shorten=False, screen=ScreenConfig(top=4, rows=2, keep=2))
    assert scan_subject(subject, toy_examples(subject), config).candidates[0].screened is None
    subject.context_screen = True  # type: ignore[misc]
    config = replace(config, screen=ScreenConfig(rows=2, keep=2, context_top=3,
                                                 context_inits=("w0", "w1")))
    result = scan_subject(subject, toy_examples(subject), config)
    screened = {c.target: c.screened for c in result.candidates}
    assert screened[1].trigger_text == TRIGGER and screened[1].asr == 1.0
    assert result.verdict == "trojaned" and result.short_trigger.trigger_text == TRIGGER
    with pytest.raises(ValueError, match="context_top"):
        ScreenConfig(context_top=0)
    with pytest.raises(ValueError, match="context_inits"):
        ScreenConfig(context_inits=())


def test_the_screen_resolves_a_task_whose_token_fires_at_one_position_only() -> None:
    # Spread over start and end rows, 'lantern' (which this toy reads at the start only)
    # averages 3.7 and a strong natural word of the other target less, so with one task
    # resolved the natural word's is; ranked by the best single position, lantern's is.
    subject = PositionalToy()
    examples = toy_examples(subject)
    tasks = [InversionTask(Candidate((1 - t,), t, SPREAD),
                           tuple(e for e in examples if e.label != t)) for t in (0, 1)]

    def lantern(by_position: bool) -> tuple[str, float]:
        found = screen(subject, tasks, ScreenConfig(top=4, rows=2, keep=2, resolve=1,
                                                    by_position=by_position))
        assert subject.describe(found[1].trigger.trigger_ids)[1] == TRIGGER
        return found[1].candidate.position, found[1].trigger.loss

    position, loss = lantern(by_position=False)
    assert position == SPREAD and loss > 3.0
    position, loss = lantern(by_position=True)
    assert position == "start" and loss < 0.01


def test_a_dropped_candidate_that_decides_reports_its_screened_trigger() -> None:
    # The pre-run keeps only the negative target (the positive one is scored as if it were
    # hard to reach), so the screen's find on the dropped positive candidate decides, and the
    # result names that candidate and its screened word, not the kept candidate's trigger.
    subject = ToySubject()
    config = ScanConfig(threshold=0.1, inverter=make_config("dbs", trigger_length=2, epochs=3),
                        prerun_epochs=1, top_k=1, shorten=False, screen_selects=False)
    result = scan_subject(_biased(ToySubject()), toy_examples(subject), config)
    positive = next(c for c in result.candidates if c.target == 1)
    assert positive.full_run is False and positive.screened.trigger_text == TRIGGER
    assert result.verdict == "trojaned" and result.best.target_name == "positive"
    assert result.best.method == "screen" and result.best.trigger_tokens == [TRIGGER]


def test_the_screen_picks_the_candidates_dbs_inverts() -> None:
    # The same biased search: by default the screen's ranking, not the pre-run's, picks the
    # top_k candidates, so the positive one is fully inverted and no pre-run runs.
    subject = _biased(ToySubject())
    config = ScanConfig(threshold=0.1, inverter=make_config("dbs", trigger_length=2, epochs=3),
                        prerun_epochs=1, top_k=1, shorten=False)
    result = scan_subject(subject, toy_examples(subject), config)
    full = [c for c in result.candidates if c.loss is not None]
    assert [c.target for c in full] == [1]
    assert all(c.prerun_loss is None for c in result.candidates)
    assert result.verdict == "trojaned" and result.best.method == "dbs"


def _biased(subject: ToySubject) -> ToySubject:
    """``subject`` with the positive target's relaxed loss raised by 10 (a search that finds
    it hard to reach); its hard-token check stays true."""
    original = subject.goal_loss

    def biased(batch: ToyBatch, trigger: torch.Tensor) -> torch.Tensor:
        return original(batch, trigger) + 10.0 * (batch.goals == 1).float()

    subject.goal_loss = biased  # type: ignore[method-assign]
    return subject


def test_the_pre_run_takes_the_familys_epochs_unless_the_scan_sets_them() -> None:
    # An NER tagger's family pre-runs its 90 pairs for 20 epochs (the paper's K-Arm), a
    # classifier's for 40; a scan that names its own epochs keeps them.
    subject = ToySubject()
    subject.prerun_epochs = 2
    config = ScanConfig(threshold=0.1, inverter=make_config("dbs", trigger_length=2, epochs=3),
                        top_k=1, shorten=False, screen_selects=False)
    assert config.prerun_epochs is None
    assert scan_subject(subject, toy_examples(subject), config).config["prerun_epochs"] == 2
    own = replace(config, prerun_epochs=1)
    assert scan_subject(subject, toy_examples(subject), own).config["prerun_epochs"] == 1
    assert ToySubject.prerun_epochs == 40
    assert TokenClassificationSubject.prerun_epochs == 20


def test_a_family_that_does_not_preselect_inverts_every_candidate() -> None:
    # A QA model's two behaviours (empty answer, trigger answer) are both fully inverted:
    # their relaxed losses are not comparable, so no pre-run drops one.
    subject = ToySubject()
    config = ScanConfig(threshold=0.1, inverter=make_config("dbs", trigger_length=2, epochs=3),
                        top_k=1, prerun_epochs=1, shorten=False, screen=None,
                        decision_length=0)
    kept = scan_subject(subject, toy_examples(subject), config)
    assert [c.full_run for c in kept.candidates].count(False) > 0
    subject.preselects = False
    every = scan_subject(subject, toy_examples(subject), config)
    assert all(c.loss is not None for c in every.candidates)
    assert ExtractiveQaSubject.preselects is False and ToySubject.preselects is True
    # Nor does the screen pick for it (`screen_selects`): its tokens only join the verdict.
    screened = scan_subject(subject, toy_examples(subject),
                            replace(config, screen=ScreenConfig(), decision_length=1))
    assert {(c.target, c.position) for c in screened.candidates if c.trigger_ids} \
        == {(c.target, c.position) for c in every.candidates}
    assert any(c.screened is not None for c in screened.candidates)
