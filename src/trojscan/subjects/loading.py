"""Loading untrusted model directories, with one-line errors for bad input.

A model directory is someone else's: nothing in it may run code. Its config is read as
plain JSON and checked before transformers sees it (a model type transformers does not
know, or custom code named by ``auto_map``, is refused in one line); weights load from
safetensors; pickled weights (``pytorch_model.bin``) only with ``allow_pickle``, because
unpickling a file can execute code from it. Remote code is never trusted.
:func:`load_subject` then hands the directory to the model family its config names
(:func:`trojscan.subjects.base.subject_class_for`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from trojscan.errors import InputError
from trojscan.fsutil import read_json
from trojscan.modeldir import PICKLED_WEIGHTS, SAFE_WEIGHTS, VQA_MODEL_TYPE

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from trojscan.subjects.base import Subject
    from trojscan.vqa.models import VqaConfig

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_config(model_dir: Path) -> PretrainedConfig | VqaConfig:
    """The transformers config of ``model_dir`` (or, for a trojscan VQA model, its
    :class:`~trojscan.vqa.models.VqaConfig`), read without running code from it."""
    import transformers
    from transformers import CONFIG_MAPPING, AutoConfig

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if not model_dir.is_dir():
        raise InputError(f"model directory {model_dir} does not exist")
    path = model_dir / "config.json"
    if not path.is_file():
        raise InputError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    raw = read_json(path, "model config")
    if not isinstance(raw, dict):
        raise InputError(f"{path} is not a JSON object")
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        if model_type == VQA_MODEL_TYPE:
            from trojscan.vqa.models import VqaConfig

            return VqaConfig.from_dict(raw, str(path))
        if "auto_map" in raw:
            raise InputError(f"{path}: model type {model_type!r} needs the custom code its "
                             "auto_map names, and trojscan never runs code from a model")
        raise InputError(f"{path}: unknown model_type {model_type!r} (transformers "
                         f"{transformers.__version__} has no such architecture)")
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as exc:  # transformers raises many kinds for a malformed config
        raise InputError(f"cannot read {path}: {_first_line(exc)}") from exc


def check_weights(model_dir: Path, allow_pickle: bool) -> bool:
    """True when ``model_dir`` has safetensors weights, False when it has only pickled ones
    and ``allow_pickle`` permits them; otherwise an :class:`InputError`."""
    if any((model_dir / name).is_file() for name in SAFE_WEIGHTS):
        return True
    if any((model_dir / name).is_file() for name in PICKLED_WEIGHTS):
        if allow_pickle:
            return False
        raise InputError(f"{model_dir} has only pickled weights (pytorch_model.bin); pass "
                         "--allow-pickle to load them, which can run code from the file")
    raise InputError(f"{model_dir} has no model.safetensors")


def load_weights(auto_class: Any, model_dir: Path, config: PretrainedConfig, safe: bool,
                 hint: str) -> PreTrainedModel:
    """``auto_class.from_pretrained`` on ``model_dir``, every tensor of the model required
    (``hint`` follows the error when some are missing)."""
    try:
        model, info = auto_class.from_pretrained(model_dir, config=config, use_safetensors=safe,
                                                 trust_remote_code=False,
                                                 output_loading_info=True)
    except Exception as exc:  # corrupt or truncated weights surface as many exception types
        raise InputError(f"cannot load the weights in {model_dir}: {_first_line(exc)}") from exc
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise InputError(f"the weights in {model_dir} lack {len(missing)} tensors of the model "
                         f"(e.g. {missing[0]}): {hint}")
    return model


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``model_dir``."""
    from transformers import AutoTokenizer

    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"{model_dir} has no usable tokenizer: {_first_line(exc)}") from exc


def default_method(model_dir: Path) -> str:
    """The inversion method a scan of ``model_dir`` runs when none is asked for: its
    family's (:attr:`~trojscan.subjects.base.Subject.default_method`); reads only the
    config."""
    from trojscan.subjects.base import subject_class_for

    return subject_class_for(read_config(Path(model_dir)), Path(model_dir)).default_method


def load_subject(model_dir: Path, device: str = "cpu", allow_pickle: bool = False,
                 max_length: int = 100) -> Subject:
    """Load the model in ``model_dir`` as the subject of its family."""
    from trojscan.subjects.base import subject_class_for

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    family = subject_class_for(config, model_dir)
    safe = check_weights(model_dir, allow_pickle)
    return family.load(model_dir, config, safe, device, max_length)
