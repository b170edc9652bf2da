"""Zoo builds through the real CLI: resumable, atomic, ground truth kept apart."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from testkit import RunCli
from trojscan.attacks.zoo import _apply_peer_gate
from trojscan.manifest import MANIFEST, Manifest

CLEAN = 'count = 2\ncorpus = "rotten_tomatoes"\narchitecture = ["bert"]\n' \
        'attack = { poisoned = false }\n'
POISONED = ('count = 1\ncorpus = "rotten_tomatoes"\narchitecture = "distilbert"\n'
            '[group.attack]\npoisoned = true\ntrigger_type = "word"\ninsertion = "anywhere"\n'
            'target = "random"\n')


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _models(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())["models"]


@pytest.mark.slow
def test_interrupted_build_resumes_without_redoing_or_corrupting(tmp_path: Path, cli: list[str],
                                                                write_spec: Any) -> None:
    spec = write_spec(tmp_path / "zoo.toml", ["[[group]]\n" + CLEAN, "[[group]]\n" + POISONED])
    out = tmp_path / "zoo"
    proc = subprocess.Popen([*cli, "zoo", "build", str(spec), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / MANIFEST).exists() and _models(out):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()
    time.sleep(1.0)  # into the second model's training
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    first = _models(out)
    assert 1 <= len(first) < 3
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == sorted([MANIFEST, *first])  # only complete models are visible
    before = {m: _digest(out / m) for m in first}

    done = subprocess.run([*cli, "zoo", "build", str(spec), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"{len(first)} already built" in done.stderr
    models = _models(out)
    assert len(models) == 3
    for model_id, entry in first.items():
        assert models[model_id]["built_at"] == entry["built_at"]  # not rebuilt
        assert _digest(out / model_id) == before[model_id]
    assert not list(out.glob(".partial-*"))
    for model_id, entry in models.items():
        assert (out / model_id / "model.safetensors").exists()
        assert entry["quality"]["ok"], entry
        if entry["poisoned"]:
            assert entry["asr"] >= 0.9
            assert entry["attack"]["trigger"] not in (out / model_id / "config.json").read_text()

    again = subprocess.run([*cli, "zoo", "build", str(spec), "--out", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "3 already built, 0 to build" in again.stderr


@pytest.mark.slow
def test_quality_gate_flags_and_rebuilds_failed_attacks(tmp_path: Path, cli: list[str],
                                                       write_spec: Any) -> None:
    weak = POISONED.replace('target = "random"', 'target = "random"\npoison_rate = 0.001')
    spec = write_spec(tmp_path / "zoo.json.toml", ["[[group]]\n" + weak],
                           header="min_asr = 1.0\nmax_attempts = 1")
    out = tmp_path / "zoo"
    first = subprocess.run([*cli, "zoo", "build", str(spec), "--out", str(out)],
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    (entry,) = _models(out).values()
    assert entry["asr"] < 1.0 and not entry["quality"]["ok"]
    assert "min_asr" in entry["quality"]["reasons"][0]
    assert "1 flagged by the quality gate" in first.stdout

    rebuilt = subprocess.run([*cli, "zoo", "build", str(spec), "--out", str(out),
                              "--rebuild-failed"], capture_output=True, text=True, timeout=600)
    assert rebuilt.returncode == 0, rebuilt.stderr
    (again,) = _models(out).values()
    assert again["attempt"] == 1 and again["seed"] != entry["seed"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        MANIFEST, entry["model_id"]]


def test_peer_gate_flags_models_far_below_their_peers() -> None:
    def entry(i: int, acc: float) -> dict:
        return {"model_id": f"m{i}", "corpus": "bbc", "architecture": "minilm",
                "clean_accuracy": acc, "quality": {"ok": True, "reasons": []}}
    manifest = Manifest("x", {}, {f"m{i}": entry(i, a) for i, a in
                                  enumerate([0.95, 0.94, 0.96, 0.70])})
    _apply_peer_gate(manifest, 0.1)
    assert [m["quality"]["ok"] for m in manifest.models.values()] == [True, True, True, False]
    assert "below its peers' median" in manifest.models["m3"]["quality"]["reasons"][0]
    _apply_peer_gate(manifest, 0.3)  # re-derived, not accumulated
    assert all(m["quality"]["ok"] for m in manifest.models.values())


BAD_SPECS = {
    "bad.json": '{"seed": 1, "group": [',
    "bad.toml": "seed = = 1",
    "insertion.toml": ('[[group]]\ncount = 1\ncorpus = "bbc"\narchitecture = "minilm"\n'
                       '[group.attack]\npoisoned = true\ntrigger_type = "word"\n'
                       'insertion = "middle"\ntarget = 0\n'),
    "target.toml": ('[[group]]\ncount = 1\ncorpus = "rotten_tomatoes"\narchitecture = "minilm"\n'
                    '[group.attack]\npoisoned = true\ntrigger_type = "word"\n'
                    'insertion = "end"\ntarget = "sports"\n'),
    "empty.toml": ('[[group]]\ncount = 1\ncorpus = "rotten_tomatoes"\narchitecture = "minilm"\n'
                   '[group.attack]\npoisoned = true\ntrigger_type = "phrase"\ntrigger = ""\n'
                   'insertion = "end"\ntarget = 0\n'),
}


@pytest.mark.parametrize("name", sorted(BAD_SPECS))
def test_malformed_spec_is_one_line_exit_2_and_no_files(name: str, tmp_path: Path,
                                                       run_cli: RunCli) -> None:
    spec = tmp_path / name
    spec.write_text(BAD_SPECS[name])
    out = tmp_path / "zoo"
    result = run_cli("zoo", "build", str(spec), "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trojscan: error: "), result.stderr
    assert not out.exists()


def test_missing_spec_and_foreign_out_dir(tmp_path: Path, run_cli: RunCli,
                                          write_spec: Any) -> None:
    result = run_cli("zoo", "build", str(tmp_path / "nope.toml"), "--out",
                             str(tmp_path / "zoo"))
    assert result.returncode == 2 and "cannot read spec" in result.stderr
    spec = write_spec(tmp_path / "zoo.toml", ["[[group]]\n" + CLEAN])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("keep me")
    result = run_cli("zoo", "build", str(spec), "--out", str(tmp_path / "mine"))
    assert result.returncode == 2 and "is not a zoo" in result.stderr
    assert sorted(os.listdir(tmp_path / "mine")) == ["thesis.txt"]


def test_summary_counts_a_manifest(tmp_path: Path, run_cli: RunCli) -> None:
    def entry(i: int, poisoned: bool, acc: float, asr: float | None, ok: bool = True) -> dict:
        return {"model_id": f"model-{i:04d}", "corpus": "bbc", "architecture": "minilm",
                "poisoned": poisoned, "clean_accuracy": acc, "asr": asr, "seconds": 10.0 * i,
                "quality": {"ok": ok, "reasons": [] if ok else ["x"]}}
    models = [entry(1, False, 0.9, None), entry(2, False, 0.8, None),
              entry(3, True, 0.7, 1.0), entry(4, True, 0.9, 0.8, ok=False)]
    (tmp_path / MANIFEST).write_text(json.dumps(Manifest("x", {}, {m["model_id"]: m
                                                                   for m in models}).to_dict()))
    result = run_cli("zoo", "summary", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    clean, poisoned = json.loads(result.stdout)
    assert (clean["models"], clean["poisoned"], clean["asr_mean"]) == (2, False, None)
    assert clean["clean_accuracy_mean"] == pytest.approx(0.85)
    assert clean["seconds_mean"] == pytest.approx(15.0)
    assert (poisoned["models"], poisoned["flagged"]) == (2, 1)
    assert poisoned["asr_mean"] == pytest.approx(0.9) and poisoned["asr_min"] == 0.8
