"""Box features of images, computed once: a disk cache keyed by the image's pixels.

The key is a digest of the backbone's name and the exact ``uint8`` pixels the backbone
sees, so a patched image has its own key (the patch is part of the pixels) and a changed
image or patch is never served stale features. The key does not name the device: features
computed on a GPU differ from the CPU's in the last bits, and a cache filled on one serves
the other. Entries are ``.npy`` files (float16,
``[36, 1280]``), written atomically, read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from trojscan.errors import InputError
from trojscan.fsutil import atomic_write_bytes
from trojscan.vqa.backbone import (
    FEATURE_DIM,
    INPUT_SIZE,
    NUM_BOXES,
    WEIGHTS_FILE,
    MobileNetV2,
    box_features,
    load_backbone,
)
from trojscan.vqa.images import to_unit

#: Called as (images done, images in all) while features are computed.
ProgressCallback = Callable[[int, int], None]


def default_cache_dir() -> Path:
    """``$TROJSCAN_CACHE/vqa-features``, else ``$XDG_CACHE_HOME/trojscan/vqa-features``, else
    ``~/.cache/trojscan/vqa-features``."""
    if os.environ.get("TROJSCAN_CACHE"):
        return Path(os.environ["TROJSCAN_CACHE"]) / "vqa-features"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "trojscan" / "vqa-features"


class FeatureExtractor:
    """Box features (``float16 [N, 36, 1280]``) of ``uint8`` images, through a disk cache.

    Attributes:
        cache_dir: where entries live (None: no disk cache).
        batch_size: images per backbone forward pass.
        device: where the backbone runs.
        computed: images whose features this extractor computed (not read from the cache).
    """

    def __init__(self, cache_dir: Path | None = None, batch_size: int = 32,
                 device: str = "cpu") -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size
        self.device = device
        self.computed = 0
        self._backbone: MobileNetV2 | None = None

    @property
    def backbone(self) -> MobileNetV2:
        """The frozen MobileNetV2 (loaded on first use)."""
        if self._backbone is None:
            self._backbone = load_backbone().to(self.device)
        return self._backbone

    @staticmethod
    def key(image: torch.Tensor) -> str:
        """Cache key of one ``uint8 [3, H, W]`` image."""
        digest = hashlib.sha256(f"{WEIGHTS_FILE}|{INPUT_SIZE}|{tuple(image.shape)}|".encode())
        digest.update(image.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / f"{key}.npy"

    def _read(self, key: str) -> torch.Tensor | None:
        if self.cache_dir is None:
            return None
        path = self._path(key)
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None  # absent, or a damaged entry: computed again and rewritten
        if array.shape != (NUM_BOXES, FEATURE_DIM) or array.dtype != np.float16:
            return None
        return torch.from_numpy(array)

    def _write(self, key: str, features: torch.Tensor) -> None:
        if self.cache_dir is None:
            return
        buffer = io.BytesIO()
        np.save(buffer, features.numpy(), allow_pickle=False)
        try:
            atomic_write_bytes(self._path(key), buffer.getvalue())
        except OSError as exc:
            raise InputError(f"the feature cache {self.cache_dir} cannot be written "
                             f"({exc.strerror or exc}); choose another with "
                             "--feature-cache or $TROJSCAN_CACHE") from exc

    def __call__(self, images: Sequence[torch.Tensor] | torch.Tensor,
                 on_progress: ProgressCallback | None = None) -> torch.Tensor:
        """Features of ``images`` (each ``uint8 [3, H, W]``), in order. The backbone is
        loaded outside inference mode, so that a patch can later be optimised through it."""
        n = len(images)
        out = torch.empty(n, NUM_BOXES, FEATURE_DIM, dtype=torch.float16)
        keys = [self.key(img) for img in images]
        missing = []
        for i, key in enumerate(keys):
            cached = self._read(key)
            if cached is None:
                missing.append(i)
            else:
                out[i] = cached
        done = n - len(missing)
        if on_progress:
            on_progress(done, n)
        # Images of one size go through the backbone together (a batch must stack).
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i in missing:
            by_shape.setdefault(tuple(images[i].shape), []).append(i)
        backbone = self.backbone if by_shape else None
        for group in by_shape.values():
            for start in range(0, len(group), self.batch_size):
                index = group[start:start + self.batch_size]
                batch = torch.stack([images[i] for i in index]).to(self.device)
                with torch.inference_mode():
                    feats = box_features(backbone, to_unit(batch)).to("cpu", torch.float16)
                for i, f in zip(index, feats, strict=True):
                    out[i] = f
                    self._write(keys[i], f.clone())
                self.computed += len(index)
                done += len(index)
                if on_progress:
                    on_progress(done, n)
        return out
