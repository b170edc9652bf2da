"""Campaigns over a tiny zoo: every model scanned, resumable, Ray = local, errors recorded."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from testkit import TINY_SCAN, RunCli
from trojscan.attacks.zoo import build_zoo, load_zoo_spec
from trojscan.campaign.run import CampaignConfig, result_path, run_campaign
from trojscan.errors import InputError
from trojscan.manifest import MANIFEST

CLEAN = 'count = 4\ncorpus = "rotten_tomatoes"\narchitecture = "bert"\n' \
        'attack = { poisoned = false }\n'
POISONED = ('count = 4\ncorpus = "rotten_tomatoes"\narchitecture = "bert"\n'
            '[group.attack]\npoisoned = true\ntrigger_type = "word"\ninsertion = "anywhere"\n'
            'target = "random"\n')


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory, write_spec: Any) -> Path:
    """4 clean + 4 poisoned tiny BERTs (word triggers, random targets)."""
    root = tmp_path_factory.mktemp("campaign")
    spec = write_spec(root / "zoo.toml", ["[[group]]\n" + CLEAN, "[[group]]\n" + POISONED])
    build_zoo(load_zoo_spec(spec), root / "zoo")
    return root / "zoo"


@pytest.fixture(scope="module")
def local_results(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("results") / "local"
    counts = run_campaign(tiny_zoo, out, CampaignConfig(scan=TINY_SCAN, workers=2))
    assert counts == {"scanned": 8, "errors": 0, "skipped": 0, "total": 8}
    return out


def _records(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (results / "models").glob("*.json")
            if not p.name.endswith(".error.json")}


def test_campaign_scans_every_model_and_detects_all(tiny_zoo: Path, local_results: Path) -> None:
    truth = json.loads((tiny_zoo / MANIFEST).read_text())["models"]
    records = _records(local_results)
    assert sorted(records) == sorted(truth)
    for model_id, record in records.items():
        entry = truth[model_id]
        assert record["model_id"] == model_id
        assert (record["verdict"] == "trojaned") == entry["poisoned"], (model_id, record["score"])
        if entry["poisoned"]:
            assert record["best"]["target_name"] == entry["attack"]["target_name"]
            assert entry["attack"]["trigger"] in record["best"]["trigger_tokens"]
    assert json.loads((local_results / "campaign.json").read_text())["method"] == "dbs"


def test_ray_executor_gives_the_local_results(tiny_zoo: Path, local_results: Path,
                                              tmp_path: Path) -> None:
    sub = tmp_path / "zoo"
    sub.mkdir()
    chosen = sorted(_records(local_results))[:3]
    for model_id in chosen:
        shutil.copytree(tiny_zoo / model_id, sub / model_id)
    counts = run_campaign(sub, tmp_path / "ray",
                          CampaignConfig(scan=TINY_SCAN, workers=2, executor="ray"))
    assert counts["scanned"] == 3
    local, ray = _records(local_results), _records(tmp_path / "ray")
    for model_id in chosen:
        assert ray[model_id]["verdict"] == local[model_id]["verdict"]
        assert ray[model_id]["best"]["trigger_ids"] == local[model_id]["best"]["trigger_ids"]
        assert ray[model_id]["score"] == pytest.approx(local[model_id]["score"], rel=1e-3)


def test_corrupt_model_is_recorded_as_an_error(tiny_zoo: Path, tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    model_id = sorted(p.name for p in tiny_zoo.iterdir() if p.is_dir())[0]
    shutil.copytree(tiny_zoo / model_id, zoo / "good")
    shutil.copytree(tiny_zoo / model_id, zoo / "corrupt")
    (zoo / "corrupt" / "model.safetensors").write_bytes(b"not a safetensors file")
    shutil.copytree(tiny_zoo / model_id, zoo / "no-examples")
    (zoo / "no-examples" / "clean_examples.jsonl").unlink()
    results = tmp_path / "results"
    counts = run_campaign(zoo, results, CampaignConfig(scan=TINY_SCAN))
    assert counts == {"scanned": 1, "errors": 2, "skipped": 0, "total": 3}
    corrupt = json.loads(result_path(results, "corrupt", error=True).read_text())
    assert "cannot load the weights" in corrupt["error"]
    assert "clean_examples.jsonl" in json.loads(
        result_path(results, "no-examples", error=True).read_text())["error"]
    assert result_path(results, "good").exists()
    # Errors are kept on resume, and scanned again on request.
    assert run_campaign(zoo, results, CampaignConfig(scan=TINY_SCAN))["skipped"] == 3
    again = run_campaign(zoo, results, CampaignConfig(scan=TINY_SCAN, retry_errors=True))
    assert again == {"scanned": 0, "errors": 2, "skipped": 1, "total": 3}


def test_cli_campaign_says_how_many_failed_and_exits_1(tiny_zoo: Path, tmp_path: Path,
                                                       run_cli: RunCli) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    model_id = sorted(p.name for p in tiny_zoo.iterdir() if p.is_dir())[0]
    shutil.copytree(tiny_zoo / model_id, zoo / "corrupt")
    (zoo / "corrupt" / "model.safetensors").write_bytes(b"not a safetensors file")
    results = tmp_path / "results"
    run = run_cli("campaign", "run", str(zoo), "--out", str(results))
    assert run.returncode == 1, run.stderr
    assert "1 of 1 models failed" in run.stderr and "--retry-errors" in run.stderr
    assert result_path(results, "corrupt", error=True).exists()


def test_resume_needs_the_same_settings(tiny_zoo: Path, local_results: Path) -> None:
    other = replace(TINY_SCAN, threshold=0.2)
    with pytest.raises(InputError, match="other settings"):
        run_campaign(tiny_zoo, local_results, CampaignConfig(scan=other))
    assert run_campaign(tiny_zoo, local_results, CampaignConfig(scan=TINY_SCAN))["skipped"] == 8


@pytest.mark.slow
def test_killed_campaign_resumes_without_redoing_or_losing(tiny_zoo: Path, tmp_path: Path,
                                                           cli: list[str]) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for model_id in sorted(p.name for p in tiny_zoo.iterdir() if p.is_dir())[:3]:
        shutil.copytree(tiny_zoo / model_id, zoo / model_id)
    results = tmp_path / "results"
    args = [*cli, "campaign", "run", str(zoo), "--out", str(results), "--trigger-length", "1",
            "--positions", "start", "--epochs", "100", "--threshold", "0.1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if list((results / "models").glob("*.json")) if (results / "models").is_dir() else []:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {p.name: p.read_bytes() for p in (results / "models").glob("*.json")}
    assert 1 <= len(first) < 3
    assert not [p for p in (results / "models").iterdir() if not p.name.endswith(".json")
                or p.name.startswith(".")], "half-written files left behind"

    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"{len(first)} already done" in done.stderr
    after = {p.name: p.read_bytes() for p in (results / "models").glob("*.json")}
    assert len(after) == 3
    assert all(after[name] == data for name, data in first.items())  # not redone


_ORPHAN = """
import os, time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from trojscan.campaign.run import _exit_with_parent
with ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_exit_with_parent,
                         initargs=(os.getpid(),)) as pool:
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 120).result()
"""


def test_workers_end_when_the_campaign_is_killed() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{worker}").exists():
        time.sleep(0.2)
    assert not Path(f"/proc/{worker}").exists(), "the worker scans on after its campaign died"


def test_campaign_rejects_bad_input(tmp_path: Path, tiny_zoo: Path) -> None:
    with pytest.raises(InputError, match="not a directory"):
        run_campaign(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no model directories"):
        run_campaign(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(InputError, match="inside the zoo"):
        run_campaign(tiny_zoo, tiny_zoo / "results")
    with pytest.raises(InputError, match="executor"):
        CampaignConfig(executor="slurm")
    with pytest.raises(InputError, match="no model 'model-9999'"):
        run_campaign(tiny_zoo, tmp_path / "out", only=["model-9999"])


def test_campaign_scans_only_the_models_asked_for(tiny_zoo: Path, local_results: Path) -> None:
    chosen = sorted(_records(local_results))[:2]
    counts = run_campaign(tiny_zoo, local_results, CampaignConfig(scan=TINY_SCAN), only=chosen)
    assert counts == {"scanned": 0, "errors": 0, "skipped": 2, "total": 2}


def test_fit_report_and_scan_with_the_detector(tiny_zoo: Path, local_results: Path,
                                               tmp_path: Path, run_cli: RunCli) -> None:
    manifest = tiny_zoo / MANIFEST
    detector = tmp_path / "detector.json"
    fit = run_cli("campaign", "fit", str(local_results), "--manifest", str(manifest), "--out",
                  str(detector))
    assert fit.returncode == 0, fit.stderr
    assert "fitted on 8 models (4 trojaned)" in fit.stdout
    assert "training accuracy 1.000" in fit.stdout
    assert json.loads(detector.read_text())["kind"] == "threshold"

    report = run_cli("campaign", "report", str(local_results), "--manifest", str(manifest),
                     "--out", str(tmp_path / "report"), "--folds", "2", "--zoo", str(tiny_zoo))
    assert report.returncode == 0, report.stderr
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["n"] == 8 and data["poisoned"] == 4
    # The search gap: each word trigger measured as hard tokens at every position on the
    # scan's own examples; the one-slot scans reach its loss (they recover the word).
    search = data["search"]
    assert search["measured"] == 4 and search["true_target_dropped"] == 0
    for gap in search["models"].values():
        assert set(gap["true_loss"]) == {"start", "end", "first_half", "second_half"}
        assert gap["true_best"] == min(gap["true_loss"].values()) < 0.2
        assert gap["gap"] == pytest.approx(gap["inverted_loss"] - gap["true_best"])
        assert gap["searched"] == (gap["gap"] <= 1e-4)
    assert search["searched"] is not None and "true trigger's loss" in report.stdout
    rows = {r["model_id"]: r for r in data["per_model"]}
    assert all((r["true_loss"] is None) == (r["truth"] == 0) for r in rows.values())
    assert data["fixed"]["accuracy"] == 1.0 and data["roc_auc"] == 1.0
    assert data["trigger_recovery"]["recovered"] == 1.0
    assert data["target_accuracy"]["poisoned"] == 1.0
    assert "accuracy 1.000" in report.stdout
    assert (tmp_path / "report" / "roc.png").read_bytes()[:4] == b"\x89PNG"

    model_id = next(m for m, e in json.loads(manifest.read_text())["models"].items()
                    if e["poisoned"])
    out = tmp_path / "scan.json"
    examples = str(tiny_zoo / model_id / "clean_examples.jsonl")
    scan = run_cli("scan", str(tiny_zoo / model_id), "--examples", examples, "--out", str(out),
                   "--trigger-length", "1", "--positions", "start", "--epochs", "100",
                   "--detector", str(detector))
    assert scan.returncode == 0, scan.stderr
    record = json.loads(out.read_text())
    assert record["detector"]["probability"] > 0.5 and record["verdict"] == "trojaned"
    assert "probability" in scan.stdout

    bad = run_cli("scan", str(tiny_zoo / model_id), "--examples", examples, "--detector",
                  str(manifest))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr


def test_campaign_with_a_baseline_and_the_compare_table(tiny_zoo: Path, local_results: Path,
                                                        tmp_path: Path, run_cli: RunCli) -> None:
    uat = tmp_path / "uat"
    run = run_cli("campaign", "run", str(tiny_zoo), "--out", str(uat), "--method", "uat",
                  "--trigger-length", "1", "--positions", "start", "--threshold", "0.1")
    assert run.returncode == 0, run.stderr
    assert json.loads((uat / "campaign.json").read_text())["method"] == "uat"
    assert {r["best"]["method"] for r in _records(uat).values()} == {"uat"}

    out = tmp_path / "compare"
    compare = run_cli("campaign", "compare", str(local_results), str(uat), "--manifest",
                      str(tiny_zoo / MANIFEST), "--out", str(out))
    assert compare.returncode == 0, compare.stderr
    table = json.loads((out / "compare.json").read_text())
    assert table["methods"] == ["dbs", "uat"]  # from each campaign.json
    rows = {row["key"]: row["values"] for row in table["rows"]}
    assert rows["models"] == {"dbs": 8, "uat": 8}
    assert rows["accuracy"]["dbs"] == 1.0
    assert "| metric | dbs | uat |" in (out / "compare.md").read_text()

    named = run_cli("campaign", "compare", str(local_results), str(uat), "--manifest",
                    str(tiny_zoo / MANIFEST), "--out", str(out), "--names", "only-one")
    assert named.returncode == 2 and "--names gives 1 names" in named.stderr
