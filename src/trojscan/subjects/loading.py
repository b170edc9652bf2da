"""Loading untrusted models and example files, with one-line errors for bad input.

A model directory is someone else's: nothing in it may run code. Weights load from
safetensors; pickled weights (``pytorch_model.bin``) only with ``allow_pickle``, because
unpickling a file can execute code from it. Remote code is never trusted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trojscan.errors import InputError
from trojscan.fsutil import read_utf8
from trojscan.subjects.text import TextSubject

PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SAFE = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")


def load_subject(model_dir: Path, device: str = "cpu", allow_pickle: bool = False,
                 max_length: int = 100) -> TextSubject:
    """Load the sequence classifier in ``model_dir`` as a :class:`TextSubject`."""
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if not model_dir.is_dir():
        raise InputError(f"model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as exc:
        raise InputError(f"cannot read {model_dir / 'config.json'}: {exc}") from exc
    heads = [a for a in (config.architectures or []) if a.endswith("ForSequenceClassification")]
    if not heads:
        raise InputError(f"{model_dir} holds no sequence-classification model (architectures: "
                         f"{', '.join(config.architectures or ['none'])})")
    safe = any((model_dir / name).is_file() for name in SAFE)
    pickled = any((model_dir / name).is_file() for name in PICKLED)
    if not safe and not (pickled and allow_pickle):
        if pickled:
            raise InputError(f"{model_dir} has only pickled weights (pytorch_model.bin); pass "
                             "--allow-pickle to load them, which can run code from the file")
        raise InputError(f"{model_dir} has no model.safetensors")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            model_dir, config=config, use_safetensors=safe, trust_remote_code=False,
            output_loading_info=True)
    except Exception as exc:  # corrupt or truncated weights surface as many exception types
        raise InputError(f"cannot load the weights in {model_dir}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise InputError(f"the weights in {model_dir} lack {len(missing)} tensors of the model "
                         f"(e.g. {missing[0]}): is the classification head saved?")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"{model_dir} has no usable tokenizer: "
                         f"{str(exc).splitlines()[0]}") from exc
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise InputError(f"the tokenizer in {model_dir} has no [CLS]/[SEP] tokens, which "
                         "trigger slots are placed between")
    return TextSubject(model.to(device), tokenizer, max_length)


def load_examples(path: Path, labels: tuple[str, ...]) -> list[dict[str, Any]]:
    """Read clean examples, one JSON object ``{"text", "label"}`` per line.

    ``label`` is a label index or name of the model; every problem is an
    :class:`InputError` naming the line.
    """
    text = read_utf8(path, "examples")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) \
                or "label" not in row:
            raise InputError(f"{path}:{number}: expected an object with \"text\" and \"label\"")
        if not row["text"].strip():
            raise InputError(f"{path}:{number}: empty text")
        label = row["label"]
        if isinstance(label, str) and label in labels:
            label = labels.index(label)
        if isinstance(label, bool) or not isinstance(label, int) \
                or not 0 <= label < len(labels):
            raise InputError(f"{path}:{number}: the model has no label {row['label']!r} (its "
                             "labels: " + ", ".join(f"{i}={n}" for i, n in enumerate(labels))
                             + ")")
        rows.append({"text": row["text"], "label": label})
    if not rows:
        raise InputError(f"examples {path} are empty")
    return rows
