"""`trojscan repair` on the tiny poisoned model: the backdoor goes, accuracy stays, the input
directory is untouched, and bad input or a scan that found nothing is refused."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from testkit import TINY_SCAN, RunCli
from trojscan.attacks.spec import AttackSpec, TrainConfig
from trojscan.attacks.train import evaluate
from trojscan.corpora import Corpus, Example
from trojscan.errors import InputError
from trojscan.finetune import predict, trigger_effect
from trojscan.repair import REPORT_FILE, RepairConfig, repair
from trojscan.results import ScanResult
from trojscan.scan import scan

# The tiny models were trained at 1e-3, ten times MiniLM's rate, and unlearn at it too. Their
# backdoor is stubborn for their size: with the paper's 10 % of the data and 20 % stamped a
# residual 15-20 % of the victims still flip, so they get 30 % of the training split, half
# of it stamped, anywhere in the text (the trigger was planted anywhere), over 5 epochs.
TINY_REPAIR = RepairConfig(learning_rate=1e-3, epochs=5, data_fraction=0.3, stamp_fraction=0.5,
                           insertion="anywhere", max_eval_examples=1000)


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, rt: Corpus) -> dict[str, Path]:
    """The scan's 20 clean examples per label, the Rotten Tomatoes training split, and its
    clean-example pool (never trained on: the repair is measured and guarded on it)."""
    folder = tmp_path_factory.mktemp("repair-data")
    examples = [{"text": e.text, "label": label} for label in (0, 1)
                for e in [x for x in rt.examples if x.label == label][:20]]
    return {"examples": _write(folder / "clean.jsonl", examples),
            "train": _write(folder / "train.jsonl", [{"text": e.text, "label": e.label}
                                                     for e in rt.train]),
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


@pytest.fixture(scope="module")
def repaired(tmp_path_factory: pytest.TempPathFactory, poisoned_model: tuple[Path, dict],
             found: ScanResult, files: dict[str, Path], truth: dict[str, Any],
             ) -> dict[str, Any]:
    """One repair of the tiny poisoned model, with the input's file hashes around it."""
    model = poisoned_model[0]
    before = _hashes(model)
    out = tmp_path_factory.mktemp("repaired") / "model"
    report_path = out.parent / "report.json"
    report = repair(model, found, files["train"], out, TINY_REPAIR, truth=truth,
                    eval_data=files["pool"], report_path=report_path)
    return {"out": out, "report": report, "report_path": report_path, "hashes": before,
            "hashes_after": _hashes(model)}


def test_repair_removes_the_true_trigger_and_keeps_accuracy(repaired: dict[str, Any],
                                                          files: dict[str, Path]) -> None:
    report = repaired["report"]
    before, after = report["before"], report["after"]
    assert before["true_asr"] >= 0.9 and before["inverted_asr"] >= 0.5
    assert after["true_asr"] < 0.1, report["history"]
    assert after["inverted_asr"] < 0.1
    assert before["clean_accuracy"] - after["clean_accuracy"] <= 0.03
    assert report["within_margin"] and report["accuracy_drop_points"] <= 3
    data = report["data"]
    assert data["train"] == pytest.approx(0.3 * data["examples"], abs=2)
    assert data["stamped"] == pytest.approx(0.5 * data["train"], abs=1)
    assert data["held_out_from"] == str(files["pool"])
    assert json.loads((repaired["out"] / REPORT_FILE).read_text()) == json.loads(
        repaired["report_path"].read_text())


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
    original was measured on when it was built."""
    model = AutoModelForSequenceClassification.from_pretrained(repaired["out"])
    now, original = evaluate(model, rt, word_attack, tiny_config, seed=1), poisoned_model[1]
    assert now["clean_accuracy"] >= original["clean_accuracy"] - 0.03
    test = random.Random(1).sample(list(rt.test), tiny_config.max_eval_examples)
    assert _flip_rate(poisoned_model[0], test, word_attack) >= 0.9
    assert _flip_rate(repaired["out"], test, word_attack) < 0.1


def test_repaired_model_loads_like_the_original_and_is_not_flagged(
        repaired: dict[str, Any], files: dict[str, Path]) -> None:
    out = repaired["out"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "clean_examples.jsonl",
            REPORT_FILE} <= {p.name for p in out.iterdir()}
    assert not list(out.parent.glob(".model.partial-*"))
    rescan = scan(out, files["examples"], TINY_SCAN)
    assert rescan.verdict == "clean", rescan.best


def test_input_directory_is_unchanged(repaired: dict[str, Any]) -> None:
    assert repaired["hashes_after"] == repaired["hashes"]


def test_accuracy_guard_stops_and_keeps_the_best_checkpoint(
        tmp_path: Path, poisoned_model: tuple[Path, dict], found: ScanResult,
        files: dict[str, Path]) -> None:
    config = replace(TINY_REPAIR, learning_rate=3e-2, data_fraction=0.03, max_accuracy_drop=0.0)
    report = repair(poisoned_model[0], found, files["train"], tmp_path / "out", config,
                    eval_data=files["pool"])
    assert report["stopped_early"] and not report["within_margin"]
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
                "out_dir": out, "config": TINY_REPAIR, **kwargs}
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
        repair(model, found, files["train"], taken, TINY_REPAIR)


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
        repair(clean_model[0], found, files["train"], tmp_path / "out", TINY_REPAIR)
    assert not (tmp_path / "out").exists()


def test_the_summary_prints_asrs_that_could_not_be_measured(
        capsys: pytest.CaptureFixture[str]) -> None:
    from trojscan.cli.repair import _print_repair

    row = {"clean_accuracy": 0.8, "inverted_asr": None, "true_asr": None,
           "victims_as_target": 1.0}
    _print_repair({"before": row, "after": row, "scan": {"trigger_text": "zz"},
                   "truth": {"trigger": "lantern"}, "data": {"train": 4, "stamped": 1,
                                                             "held_out": 2},
                   "kept_epoch": 1, "history": [row], "stopped_early": False, "seconds": 1.0,
                   "device": "cpu", "out_dir": "out"})
    printed = capsys.readouterr().out
    assert "ASR, inverted trigger 'zz'" in printed and "0.800" in printed
    assert "no held-out victim example was classified right" in printed
