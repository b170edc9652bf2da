"""Seconds and peak memory to compute the box features of every easy-VQA image.

    .venv/bin/python benchmarks/vqa_features.py [--threads 2] [--batch-size 32]
        [--out benchmarks/results/vqa_features.json]

The 5,000 images (4,000 train, 1,000 test) go through the frozen ImageNet MobileNetV2 at
192 x 192 (36 boxes x 1280 each) into a fresh, temporary feature cache: the cold cost a
fresh machine pays once per cache. Then the same images are read back from the cache (the
cost every later zoo build pays), and the cache's size on disk is measured. Peak RSS is
the process's own (``ru_maxrss``).
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

from trojscan.attacks.easy_vqa import load_easy_vqa
from trojscan.fsutil import atomic_write_json
from trojscan.vqa.features import FeatureExtractor
from trojscan.vqa.images import read_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vqa_features.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    corpus = load_easy_vqa()
    started = time.perf_counter()
    paths = list(corpus.train_images.values()) + list(corpus.test_images.values())
    images = [read_image(p) for p in paths]
    read_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as cache:
        cold = FeatureExtractor(Path(cache), batch_size=args.batch_size)
        tick = time.perf_counter()
        feats = cold(images)
        cold_seconds = time.perf_counter() - tick
        warm = FeatureExtractor(Path(cache))
        tick = time.perf_counter()
        again = warm(images)
        warm_seconds = time.perf_counter() - tick
        size = sum(p.stat().st_size for p in Path(cache).rglob("*.npy"))
    assert torch.equal(feats, again) and warm.computed == 0
    result = {
        "images": len(images), "threads": args.threads, "batch_size": args.batch_size,
        "decode_seconds": round(read_seconds, 2),
        "compute_seconds": round(cold_seconds, 2),
        "ms_per_image": round(1000 * cold_seconds / len(images), 2),
        "cached_read_seconds": round(warm_seconds, 2),
        "cache_mib": round(size / 2**20, 1),
        "features_in_memory_mib": round(feats.numel() * feats.element_size() / 2**20, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
