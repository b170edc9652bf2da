"""Seconds and peak memory to build one poisoned MiniLM model on Rotten Tomatoes.

    .venv/bin/python benchmarks/build_one.py [--epochs 2] [--out benchmarks/results/build_one.json]

Runs in its own process so that peak RSS (``ru_maxrss``) is this build's alone. Uses the
training settings of examples/zoo-minilm.toml (2 epochs, batch 32, max length 128, AdamW 1e-4).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from trojscan.attacks.spec import AttackSpec, TrainConfig
from trojscan.attacks.train import build_one
from trojscan.corpora import load_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--lr", type=float, default=None, help="default: TrainConfig's")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/build_one.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    corpus = load_corpus("rotten_tomatoes")
    attack = AttackSpec.from_dict({"poisoned": True, "trigger_type": "word", "trigger": "lantern",
                                   "insertion": "anywhere", "target": "positive"}, corpus.labels)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = build_one(Path(tmp) / "model", corpus, "minilm", attack,
                            TrainConfig(epochs=args.epochs, learning_rate=args.lr), args.seed)
    result = {
        "benchmark": "build one MiniLM model, Rotten Tomatoes, word trigger, poison rate 0.1",
        "epochs": args.epochs,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "build_seconds": metrics["seconds"],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "clean_accuracy": round(metrics["clean_accuracy"], 4),
        "asr": round(metrics["asr"], 4),
        "train_examples": metrics["train_examples"],
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
