"""The TrojAI detector interface: how evaluators (IARPA TrojAI and its successors) call a
detector, after usnistgov/trojai-example's ``entrypoint.py``.

``infer`` scans one model and writes one number, the probability that it is trojaned, to the
result file; ``configure`` scans a folder of labelled models and fits the detector that
``infer`` later reads from the learned-parameters folder. Every knob comes from a
metaparameters file (names ``infer_*`` and ``train_*``) validated against its JSON Schema
with the jsonschema package before anything runs; the repository's ``trojai/`` folder holds
both, with the container definitions that install trojscan and run this entry point.

Model formats: a Hugging Face directory (what trojscan scans everywhere, and how later rounds
ship models), or a round's ``model.pt``: a pickled torch module, which loading *runs*, so it
is read only when the metaparameters set ``infer_allow_pickle`` (and its tokenizer, a
directory or a pickled ``.pt``, likewise); it is then saved as a safetensors directory in
the scratch folder and scanned from there.

Clean examples (``--examples_dirpath``): a ``clean_examples.jsonl`` in trojscan's format of the
model's family, or the text rounds' ``class_K_example_N.txt`` files (label K, the file's text).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from trojscan.campaign.report import cross_validate
from trojscan.detect import (
    DETECTORS,
    Detector,
    load_detector,
    make_detector,
    save_detector,
)
from trojscan.errors import InputError
from trojscan.fsutil import atomic_write_json, atomic_write_text, read_json, read_utf8
from trojscan.inversion.base import method_names
from trojscan.manifest import MANIFEST, load_truth
from trojscan.modeldir import SAFE_WEIGHTS
from trojscan.results import ScanResult
from trojscan.scan import ScanConfig, scan, scan_config

#: The fitted detector in the learned-parameters folder.
DETECTOR_FILE = "detector.json"
#: The examples file of trojscan's own layout.
EXAMPLES_FILE = "clean_examples.jsonl"
#: A model folder's label in a TrojAI training set: 1 trojaned, 0 clean.
GROUND_TRUTH_FILE = "ground_truth.csv"
#: The text rounds' example files: class_<label>_example_<n>.txt.
TEXT_EXAMPLE = re.compile(r"class_(\d+)_example_(\d+)\.txt")
#: Slope of the probability without a fitted detector: sigmoid(slope * (log(beta) -
#: log(score))), beta the scan's own threshold; uncalibrated (``configure`` fits one).
UNFITTED_SLOPE = 1.0
#: What ``train_detector`` may name, and ``auto`` (chosen by cross-validated AUC with
#: ``--automatic_configuration``).
TRAIN_DETECTORS = (*DETECTORS, "auto")


@dataclass(frozen=True)
class Metaparameters:
    """The knobs of a metaparameters file (the schema in ``trojai/`` documents each)."""

    infer_method: str
    infer_epochs: int | None
    infer_trigger_length: int | None
    infer_positions: str
    infer_pairs: bool | None
    infer_max_victims: int
    infer_decision_length: int
    infer_natural_share: float
    infer_seed: int
    infer_device: str
    infer_allow_pickle: bool
    train_detector: str
    train_folds: int

    def scan_config(self, model: Path) -> ScanConfig:
        """The scan these knobs describe for ``model`` (``auto``: its family's method)."""
        from trojscan.subjects.loading import default_method

        method = default_method(model) if self.infer_method == "auto" else self.infer_method
        positions = [] if self.infer_positions == "all" else [
            p.strip() for p in self.infer_positions.split(",") if p.strip()]
        return scan_config(method, None, positions, self.infer_pairs, self.infer_epochs,
                           self.infer_trigger_length, self.infer_max_victims, self.infer_seed,
                           self.infer_decision_length, self.infer_natural_share)


def read_metaparameters(path: Path, schema_path: Path) -> Metaparameters:
    """The metaparameters in ``path``, validated against the JSON Schema in ``schema_path``;
    an :class:`InputError` names the first field that fails (or the file that is bad)."""
    data = read_json(Path(path), "metaparameters")
    schema = read_json(Path(schema_path), "metaparameters schema")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InputError(f"metaparameters schema {schema_path} is not a JSON Schema: "
                         f"{exc.message}") from exc
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise InputError(f"metaparameters {path}: field {where}: {error.message}")
    known = set(Metaparameters.__dataclass_fields__)
    missing = sorted(known - set(data))
    if missing:
        raise InputError(f"metaparameters {path}: field {missing[0]} is missing (the schema "
                         f"{schema_path} does not require it; trojscan does)")
    meta = Metaparameters(**{k: data[k] for k in known})
    if meta.infer_method != "auto" and meta.infer_method not in method_names():
        raise InputError(f"metaparameters {path}: field infer_method: unknown method "
                         f"{meta.infer_method!r}")
    return meta


def _loaded_pickle(path: Path, what: str, allow_pickle: bool) -> Any:
    import torch

    if not allow_pickle:
        raise InputError(f"{path} is a pickled {what}: loading it runs code from the file; "
                         "set infer_allow_pickle in the metaparameters to trust it")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a corrupt pickle surfaces as many exception types
        raise InputError(f"cannot unpickle the {what} {path}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         ) from exc


def model_directory(model: Path, tokenizer: Path | None, scratch: Path,
                    allow_pickle: bool) -> Path:
    """A Hugging Face directory of the model at ``model``: itself when it is one (or the
    folder of its ``model.safetensors``); for a pickled round ``model.pt``, the module and
    its tokenizer saved as safetensors under ``scratch`` (only with ``allow_pickle``)."""
    from transformers import AutoTokenizer, PreTrainedModel

    model = Path(model)
    if model.is_dir():
        return model
    if not model.is_file():
        raise InputError(f"model {model} does not exist")
    if model.name in SAFE_WEIGHTS:
        return model.parent
    module = _loaded_pickle(model, "model", allow_pickle)
    if not isinstance(module, PreTrainedModel):
        raise InputError(f"{model} holds a {type(module).__name__}, not a Hugging Face "
                         "model; trojscan scans transformers models and its VQA directories")
    source = tokenizer if tokenizer is not None else model.parent
    if source.is_dir():
        try:
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(f"no usable tokenizer in {source} (give --tokenizer_filepath): "
                             f"{str(exc).splitlines()[0]}") from exc
    else:
        tok = _loaded_pickle(source, "tokenizer", allow_pickle)
        if not hasattr(tok, "save_pretrained"):
            raise InputError(f"{source} holds a {type(tok).__name__}, not a tokenizer")
    out = Path(scratch) / "model"
    module.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def examples_file(examples_dir: Path, scratch: Path) -> Path:
    """The clean examples of ``examples_dir`` as one trojscan examples file: its
    ``clean_examples.jsonl``, or its ``class_K_example_N.txt`` files written as one under
    ``scratch``."""
    examples_dir = Path(examples_dir)
    if examples_dir.is_file():
        return examples_dir
    if not examples_dir.is_dir():
        raise InputError(f"examples folder {examples_dir} does not exist")
    if (examples_dir / EXAMPLES_FILE).is_file():
        return examples_dir / EXAMPLES_FILE
    rows = []
    for path in sorted(examples_dir.iterdir()):
        match = TEXT_EXAMPLE.fullmatch(path.name)
        if match:
            rows.append({"text": read_utf8(path, "example").strip(),
                         "label": int(match.group(1))})
    if not rows:
        raise InputError(f"{examples_dir} has neither {EXAMPLES_FILE} nor "
                         "class_K_example_N.txt files")
    out = Path(scratch) / EXAMPLES_FILE
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    return out


def _unfitted(result: ScanResult) -> float:
    """The probability of "trojaned" without a fitted detector (see :data:`UNFITTED_SLOPE`)."""
    beta = float(result.threshold)
    margin = math.log(max(beta, 1e-12)) - math.log(max(float(result.score), 1e-12))
    return 1.0 / (1.0 + math.exp(-UNFITTED_SLOPE * margin))


def infer(model: Path, result_path: Path, scratch: Path, examples: Path,
          meta: Metaparameters, learned: Path, tokenizer: Path | None = None,
          warn: Callable[[str], None] | None = None) -> tuple[float, ScanResult]:
    """Scan ``model`` and write its probability of "trojaned" to ``result_path`` (one
    number, atomically); the detector is ``learned/detector.json`` when there is one, else
    the scan's own threshold with an uncalibrated slope (``warn`` says so). Returns the
    probability and the scan result (also kept as ``scratch/scan.json``)."""
    detector_path = Path(learned) / DETECTOR_FILE
    detector = load_detector(detector_path) if detector_path.is_file() else None
    result = scan_model(model, scratch, examples, meta, tokenizer)
    if detector is not None:
        probability = float(detector.predict_proba([result])[0, 1])
    else:
        probability = _unfitted(result)
        if warn:
            warn(f"no {DETECTOR_FILE} in {learned}: the probability is the scan's threshold "
                 "rule, uncalibrated (run `trojscan trojai configure` to fit a detector)")
    atomic_write_json(Path(scratch) / "scan.json", result.to_dict())
    atomic_write_text(Path(result_path), f"{probability:.6f}\n")
    return probability, result


def scan_model(model: Path, scratch: Path, examples: Path, meta: Metaparameters,
               tokenizer: Path | None = None) -> ScanResult:
    """The scan the metaparameters describe of the model at ``model`` (a pickled one saved
    as a directory under ``scratch`` first, :func:`model_directory`) on the examples of
    ``examples`` (:func:`examples_file`)."""
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    directory = model_directory(model, tokenizer, scratch, meta.infer_allow_pickle)
    return scan(directory, examples_file(examples, scratch), meta.scan_config(directory),
                _device(meta.infer_device), meta.infer_allow_pickle)


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def training_models(folder: Path) -> dict[str, tuple[Path, Path, int]]:
    """The labelled models of a configure folder, by name: (model, examples, label 1 =
    trojaned). Labels come from the folder's zoo manifest (models that passed its quality
    gate) or from each model folder's ``ground_truth.csv``; a model is its folder (a
    Hugging Face directory) or its ``model.pt``, its examples its ``clean_examples.jsonl``
    or its ``clean-example-data`` / ``example_data`` folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"models folder {folder} does not exist")
    truth: Mapping[str, Mapping[str, Any]] | None = None
    if (folder / MANIFEST).is_file():
        truth = load_truth(folder / MANIFEST)
    out = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if truth is not None:
            if sub.name not in truth:
                continue
            label = int(bool(truth[sub.name]["poisoned"]))
        elif (sub / GROUND_TRUTH_FILE).is_file():
            text = read_utf8(sub / GROUND_TRUTH_FILE, "ground truth").strip()
            if text not in ("0", "1"):
                raise InputError(f"{sub / GROUND_TRUTH_FILE} holds {text[:20]!r}, not 0 or 1")
            label = int(text)
        else:
            continue
        model = sub if (sub / "config.json").is_file() else sub / "model.pt"
        examples = next((p for p in (sub / EXAMPLES_FILE, sub / "clean-example-data",
                                     sub / "example_data") if p.exists()), sub)
        out[sub.name] = (model, examples, label)
    if len({label for _, _, label in out.values()}) < 2:
        raise InputError(f"{folder} needs labelled models of both classes (a zoo manifest or "
                         f"{GROUND_TRUTH_FILE} per model folder); found {len(out)} model(s)")
    return out


def configure(models: Path, scratch: Path, meta: Metaparameters, learned: Path,
              automatic: bool = False, tokenizers: Path | None = None,
              progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Scan every labelled model of ``models`` (a scan kept in ``scratch/scans`` is reused,
    so a stopped configure resumes), fit the ``train_detector`` detector on the results and
    write it to ``learned/detector.json``; with ``automatic`` (or ``train_detector`` auto),
    the kind with the higher cross-validated AUC. Returns a summary (also written beside
    the detector as ``configure.json``)."""
    chosen = training_models(models)
    kept = Path(scratch) / "scans"
    kept.mkdir(parents=True, exist_ok=True)
    records, labels = [], []
    for done, (name, (model, examples, label)) in enumerate(chosen.items()):
        if progress:
            progress(done, len(chosen), name)
        path = kept / f"{name}.json"
        if path.is_file():
            result = ScanResult.from_dict(read_json(path, "scan result"))
        else:
            tokenizer = tokenizers / name if tokenizers is not None and \
                (tokenizers / name).exists() else None
            result = scan_model(model, Path(scratch) / name, examples, meta, tokenizer)
            atomic_write_json(path, result.to_dict())
        records.append(result)
        labels.append(label)
    import numpy as np

    y = np.array(labels)
    kind = meta.train_detector
    scores = {}
    if automatic or kind == "auto":
        scores = {k: cross_validate(records, y, k, meta.train_folds, meta.infer_seed
                                    ).get("roc_auc") for k in DETECTORS}
        kind = max(DETECTORS, key=lambda k: scores[k] if scores[k] is not None else -1.0)
    detector: Detector = make_detector(kind).fit(records, y)
    Path(learned).mkdir(parents=True, exist_ok=True)
    save_detector(detector, Path(learned) / DETECTOR_FILE)
    summary = {"models": len(records), "trojaned": int(y.sum()), "detector": kind,
               "cross_validated_auc": scores or None,
               "training_accuracy": float(np.mean(detector.predict(records) == y))}
    atomic_write_json(Path(learned) / "configure.json", summary)
    return summary

