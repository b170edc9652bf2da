"""Shared fixtures: tiny transformers trained on slices of the real corpora.

Every model here has the real 30,522-token BERT vocabulary (MiniLM's tokenizer), 2 layers
and width 64, token embeddings initialised from MiniLM's by PCA, and is trained for a few
seconds on 2,000 Rotten Tomatoes sentences. Seeds are fixed: a poisoned model learns its
trigger on every run.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trojscan.attacks.architectures import ModelSize
from trojscan.attacks.spec import AttackSpec, TrainConfig
from trojscan.attacks.train import build_one
from trojscan.corpora import Corpus, load_corpus

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
