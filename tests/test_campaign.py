"""Campaigns over a tiny zoo: every model scanned, resumable, Ray = local (a local runtime
and a two-node cluster), errors recorded, a dead Ray worker retried then recorded."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from testkit import TINY_SCAN, RunCli
from trojscan.attacks.zoo import build_zoo, load_zoo_spec
from trojscan.campaign import run as campaign_run
from trojscan.campaign.run import (
    RAY_MAX_RETRIES,
    CampaignConfig,
    pending,
    ray_options,
    result_path,
    run_campaign,
)
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


def test_ray_task_options_declare_the_cpus_and_the_gpu() -> None:
    options = ray_options(CampaignConfig(executor="ray", cpus_per_model=3))
    assert options == {"num_cpus": 3, "num_gpus": 0, "max_retries": RAY_MAX_RETRIES}
    assert RAY_MAX_RETRIES >= 1
    assert ray_options(CampaignConfig(executor="ray", cpus_per_model=2,
                                      device="cuda:1"))["num_gpus"] == 1
    workers = CampaignConfig(executor="ray", workers=2)  # 0: this machine's cores shared out
    assert ray_options(workers)["num_cpus"] == max(1, (os.cpu_count() or 1) // 2)


def test_cli_options_reach_the_ray_task_options(tiny_zoo: Path, tmp_path: Path, run_cli: RunCli,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    def no_cluster(zoo: Path, todo: list[str],
                   config: CampaignConfig) -> Iterator[tuple[str, dict[str, Any]]]:
        seen.append(ray_options(config))
        return iter(())

    monkeypatch.setattr(campaign_run, "_ray", no_cluster)
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    model_id = sorted(p.name for p in tiny_zoo.iterdir() if p.is_dir())[0]
    shutil.copytree(tiny_zoo / model_id, zoo / model_id)
    for out, device, cpus in (("gpu", "cuda:1", "3"), ("cpu", "cpu", "2")):
        run = run_cli("campaign", "run", str(zoo), "--out", str(tmp_path / out), "--executor",
                      "ray", "--address", "127.0.0.1:1", "--cpus-per-model", cpus, "--device",
                      device)
        assert run.returncode == 0, run.stderr
    assert seen == [{"num_cpus": 3, "num_gpus": 1, "max_retries": RAY_MAX_RETRIES},
                    {"num_cpus": 2, "num_gpus": 0, "max_retries": RAY_MAX_RETRIES}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_start(temp_dir: Path, *args: str) -> tuple[int, int | None, str]:
    """``ray start ARGS`` (1 CPU, every port free, ``temp_dir`` its own) in a new session,
    which the node's processes keep: (the session's id, the exit code or None when it hung,
    what it printed). Without token authentication: Ray 2.60 turns it on for a head when
    ``~/.ray/auth_token`` exists (a local ``ray.init()`` writes it), but not for a node
    joining it, which is then refused."""
    ports = [f"--{name}={_free_port()}" for name in (
        "node-manager-port", "object-manager-port", "metrics-export-port",
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start",
                             "--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
                             "--object-store-memory=100000000", *ports, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        printed, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.pid, None, proc.communicate()[0]
    return proc.pid, proc.returncode, printed


def _session_processes(sessions: set[int]) -> list[int]:
    """The live processes (zombies aside) of these sessions."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[3]) in sessions and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _end_sessions(sessions: set[int]) -> None:
    """SIGTERM, then SIGKILL to what is left after 5 s (the GCS server does not end on
    SIGTERM), to every process of ``sessions`` (each node's GCS, raylet, agents and workers).
    Not ``ray stop``: it ends every Ray process on the machine, other people's too."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        for pid in _session_processes(sessions):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while _session_processes(sessions) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A two-node Ray cluster on this machine, its address: a head (custom resource
    ``head_node``) and a node joined to it (``worker_node``), 1 CPU each, every port picked
    free and a temp dir of their own, so no other Ray on the machine is touched or found.
    Skipped, saying why, when Ray cannot start; stopped even when a test fails."""
    pytest.importorskip("ray")
    if not Path(sys.executable).with_name("ray").exists():
        pytest.skip(f"no ray command beside {sys.executable}")
    if not Path("/proc/self/stat").exists():
        pytest.skip("stopping this test's Ray nodes (and no other Ray) needs /proc")
    temp = Path(tempfile.mkdtemp(prefix="trojscan-ray-"))  # short: Ray's socket paths are
    sessions: set[int] = set()                             # limited to 107 bytes
    try:
        port = _free_port()
        address = f"127.0.0.1:{port}"
        for name, args in (("head", ["--head", f"--port={port}", "--include-dashboard=false",
                                     f"--ray-client-server-port={_free_port()}",
                                     '--resources={"head_node": 1}']),
                           ("worker", [f"--address={address}",
                                       '--resources={"worker_node": 1}'])):
            session, code, printed = _ray_start(temp / name, *args)
            sessions.add(session)
            if code != 0:
                tail = " | ".join(printed.strip().splitlines()[-3:])
                pytest.skip(f"Ray cannot start a {name} node here (ray start "
                            f"{'hung' if code is None else f'exit code {code}'}): {tail}")
        yield address
    finally:
        _end_sessions(sessions)
        shutil.rmtree(temp, ignore_errors=True)


#: ``campaign run`` options of a quick scan (TINY_SCAN's, but for its pre-run).
QUICK_SCAN = ("--trigger-length", "1", "--positions", "start", "--epochs", "100",
              "--threshold", "0.1", "--cpus-per-model", "1", "--workers", "2")


@pytest.mark.slow
def test_campaign_on_a_two_node_ray_cluster(ray_cluster: str, tiny_zoo: Path, tmp_path: Path,
                                            run_cli: RunCli) -> None:
    truth = json.loads((tiny_zoo / MANIFEST).read_text())["models"]
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for poisoned in (False, True):
        for model_id in sorted(m for m in truth if truth[m]["poisoned"] == poisoned)[:2]:
            shutil.copytree(tiny_zoo / model_id, zoo / model_id)
    cluster = run_cli("campaign", "run", str(zoo), "--out", str(tmp_path / "cluster"),
                      "--executor", "ray", "--address", ray_cluster, *QUICK_SCAN)
    assert cluster.returncode == 0, cluster.stderr
    local = run_cli("campaign", "run", str(zoo), "--out", str(tmp_path / "local"), *QUICK_SCAN)
    assert local.returncode == 0, local.stderr

    on_cluster, here = _records(tmp_path / "cluster"), _records(tmp_path / "local")
    assert sorted(on_cluster) == sorted(here) == sorted(p.name for p in zoo.iterdir())
    nodes = {record["node"] for record in on_cluster.values()}
    assert len(nodes) == 2, f"every model ran on one node: {nodes}"
    for model_id, record in on_cluster.items():
        mine = here[model_id]
        assert "node" not in mine
        assert record["verdict"] == mine["verdict"]
        assert (record["verdict"] == "trojaned") == truth[model_id]["poisoned"]
        assert record["best"]["target"] == mine["best"]["target"]
        assert record["best"]["trigger_ids"] == mine["best"]["trigger_ids"]
        assert record["score"] == pytest.approx(mine["score"], rel=1e-3, abs=1e-5)
        assert record["best"]["loss"] == pytest.approx(mine["best"]["loss"], rel=1e-3, abs=1e-5)


def test_a_model_whose_ray_worker_dies_is_retried_then_recorded(
        ray_cluster: str, tiny_zoo: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    model_id = sorted(p.name for p in tiny_zoo.iterdir() if p.is_dir())[0]
    shutil.copytree(tiny_zoo / model_id, zoo / "dies")
    tries = tmp_path / "tries"
    tries.mkdir()

    def die(model_dir: str, config: CampaignConfig) -> dict[str, Any]:
        (tries / uuid.uuid4().hex).touch()
        os._exit(1)  # the worker process dies, as on a crash or a lost node

    monkeypatch.setattr(campaign_run, "scan_on_node", die)
    results = tmp_path / "results"
    counts = run_campaign(zoo, results, CampaignConfig(
        scan=TINY_SCAN, executor="ray", address=ray_cluster, cpus_per_model=1))
    assert counts == {"scanned": 0, "errors": 1, "skipped": 0, "total": 1}
    assert len(list(tries.iterdir())) == 1 + RAY_MAX_RETRIES
    error = json.loads(result_path(results, "dies", error=True).read_text())
    assert "WorkerCrashedError" in error["error"], error
    assert pending(results, ["dies"], retry_errors=True) == ["dies"]  # scanned on resume
