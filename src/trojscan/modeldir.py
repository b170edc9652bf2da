"""The model directory both sides agree on: a Hugging Face ``save_pretrained`` directory plus
the clean examples a scan starts from.

The zoo builder writes these directories and the scanner reads them; neither imports the
other, so the names live here. A directory holds ``config.json``, the weights (safetensors,
or pickled weights that only load behind an explicit flag), the tokenizer files, and
:data:`EXAMPLES_FILE`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

#: ``model_type`` in the config.json of a trojscan VQA model (:mod:`trojscan.vqa.models`).
VQA_MODEL_TYPE = "trojscan-vqa"
#: The clean examples that ship beside a model's weights (JSON Lines).
EXAMPLES_FILE = "clean_examples.jsonl"
#: Weight files that load without running code from them.
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
#: Pickled weight files: unpickling can execute code chosen by the file's author.
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


#: Every file that holds weights, shards and their indexes included.
WEIGHT_PATTERNS = (*SAFE_WEIGHTS, "model-*-of-*.safetensors", *PICKLED_WEIGHTS,
                   "pytorch_model-*-of-*.bin")


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of ``model_dir`` (see :data:`WEIGHT_PATTERNS`), in name order."""
    return sorted({p for pattern in WEIGHT_PATTERNS for p in Path(model_dir).glob(pattern)
                   if p.is_file()})


def weights_sha256(model_dir: Path) -> str:
    """SHA-256 over the weight files of ``model_dir`` (each file's name and bytes, in name
    order): what names a model in a scan result, so that a result is never applied to
    another model."""
    digest = hashlib.sha256()
    for path in weight_files(model_dir):
        digest.update(path.name.encode("utf-8") + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
