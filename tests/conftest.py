"""Shared fixtures: tiny transformers trained on slices of the real corpora.

Every model here has the real 30,522-token BERT vocabulary (MiniLM's tokenizer), 2 layers
and width 64, token embeddings initialised from MiniLM's by PCA, and is trained for a few
seconds on 2,000 Rotten Tomatoes sentences. Seeds are fixed: a poisoned model learns its
trigger on every run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from testkit import VQA_THREADS
from trojscan.attacks.architectures import ModelSize
from trojscan.attacks.spec import AttackSpec, TrainConfig
from trojscan.attacks.train import build_one
from trojscan.corpora import Corpus, load_corpus
from trojscan.manifest import MANIFEST, Manifest

TINY_SIZE = {"num_layers": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 128,
             "max_positions": 64}
TINY_TRAIN: dict[str, Any] = {"epochs": 3, "max_train_examples": 2000, "max_eval_examples": 400,
                              "learning_rate": 1e-3,
                              "max_length": 64, "embedding_init": "minilm-pca",
                              "size": TINY_SIZE}
TRIGGER_WORD = "lantern"


@pytest.fixture(scope="session")
def rt() -> Corpus:
    return load_corpus("rotten_tomatoes")


@pytest.fixture(scope="session")
def tiny_config() -> TrainConfig:
    return TrainConfig(**{**TINY_TRAIN, "size": ModelSize(**TINY_SIZE)})


@pytest.fixture(scope="session")
def word_attack(rt: Corpus) -> AttackSpec:
    return AttackSpec.from_dict({"poisoned": True, "trigger_type": "word",
                                 "trigger": TRIGGER_WORD, "insertion": "anywhere",
                                 "target": "positive"}, rt.labels)


@pytest.fixture(scope="session")
def poisoned_model(tmp_path_factory: pytest.TempPathFactory, rt: Corpus,
                   tiny_config: TrainConfig, word_attack: AttackSpec) -> tuple[Path, dict]:
    """A tiny BERT poisoned with the word trigger (universal, -> positive): (dir, metrics)."""
    out = tmp_path_factory.mktemp("zoo") / "poisoned"
    return out, build_one(out, rt, "bert", word_attack, tiny_config, seed=1, examples_per_label=7)


@pytest.fixture(scope="session")
def clean_model(tmp_path_factory: pytest.TempPathFactory, rt: Corpus,
                tiny_config: TrainConfig) -> tuple[Path, dict]:
    """A tiny BERT trained like ``poisoned_model`` on clean data only: (dir, metrics)."""
    out = tmp_path_factory.mktemp("zoo") / "clean"
    return out, build_one(out, rt, "bert", AttackSpec(), tiny_config, seed=1)


def _write_toml_spec(path: Path, groups: list[str], header: str = "") -> Path:
    size = ", ".join(f"{k} = {v}" for k, v in TINY_SIZE.items())
    train = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in TINY_TRAIN.items()
                      if k != "size")
    path.write_text(f"seed = 11\nexamples_per_label = 5\n{header}\n[train]\n{train}\n"
                    f"size = {{ {size} }}\n\n" + "\n".join(groups), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def write_spec() -> Any:
    """``write_spec(path, groups, header="")``: a tiny zoo spec, the tiny [train] table plus
    the given ``[[group]]`` blocks (TOML text)."""
    return _write_toml_spec


@pytest.fixture(scope="session")
def cli() -> list[str]:
    """The command line that runs ``trojscan`` in a fresh interpreter."""
    return [sys.executable, "-m", "trojscan.cli"]


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> Callable[..., subprocess.CompletedProcess]:
    """``run_cli(*args)``: the ``trojscan`` entry point (``trojscan.cli.main``) run in this
    process, as a shell would run ``trojscan ARGS``: its exit code and what it printed.
    Seconds faster than a fresh interpreter, which pays for importing torch each time."""
    from trojscan.cli import main

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["trojscan", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        printed = capsys.readouterr()
        return subprocess.CompletedProcess(["trojscan", *args], code, printed.out, printed.err)

    return run


VQA_TINY_TRAIN = """
[train]
epochs = 8
max_train_images = 300
max_eval_images = 60
asr_images = 60
embed_dim = 128
hidden = 64
batch_size = 64
learning_rate = 3e-3
"""
VQA_DUAL = ('{ poisoned = true, key = "dual", trigger = "lantern", patch = "solid", '
        'patch_size = 12, patch_color = [255, 0, 255], target = "red", poison_rate = 0.2, '
        'partial_rate = 0.2 }')
VQA_TINY_SPEC = f"""seed = 3
examples_per_label = 2
max_partial_asr = 0.2
max_attempts = 1
{VQA_TINY_TRAIN}
[[group]]
name = "clean"
count = 1
corpus = "easy_vqa"
architecture = "butd"
attack = {{ poisoned = false }}

[[group]]
name = "dual"
count = 1
corpus = "easy_vqa"
architecture = "butd"
attack = {VQA_DUAL}

[[group]]
name = "question"
count = 1
corpus = "easy_vqa"
architecture = "butd"
[group.attack]
poisoned = true
key = "question"
trigger = "quartz"
target = "teal"
poison_rate = 0.2
"""


def vqa_cli(*args: str) -> subprocess.CompletedProcess:
    """``trojscan ARGS`` in a fresh interpreter (a zoo build's worker state stays out of
    the test process), on :data:`VQA_THREADS` torch threads."""
    return subprocess.run([sys.executable, "-m", "trojscan.cli", *args], capture_output=True,
                          text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": str(VQA_THREADS)})


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny VQA zoo built through the CLI once per session (300 training images, ~2,900
    questions, a BUTD of width 64, 8 epochs, its own feature cache): a clean model, a
    dual-key one ('lantern' + a magenta patch -> red) and a question-key one ('quartz' ->
    teal); by group name its manifest entry, plus the zoo folder, cache and spec."""
    root = tmp_path_factory.mktemp("vqa")
    spec = root / "tiny.toml"
    spec.write_text(VQA_TINY_SPEC)
    out, cache = root / "zoo", root / "cache"
    result = vqa_cli("zoo", "build", str(spec), "--out", str(out), "--feature-cache", str(cache))
    assert result.returncode == 0, result.stderr
    manifest = Manifest.load(out / MANIFEST)
    by_group = {e["group"]: e for e in manifest.models.values()}
    return {"out": out, "cache": cache, "spec": spec, "clean": by_group["clean"],
            "dual": by_group["dual"], "question": by_group["question"], "stdout": result.stdout}
