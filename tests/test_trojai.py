"""The TrojAI entry point on the tiny models, through the CLI: infer in both forms (with and
without the word ``infer``), configure then infer with the learned detector, the shipped
metaparameters against their schema, bad metaparameters named by field, and pickled
models only behind infer_allow_pickle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from testkit import RunCli
from trojscan.corpora import Corpus
from trojscan.errors import InputError
from trojscan.trojai import Metaparameters, model_directory, read_metaparameters

SHIPPED = Path(__file__).resolve().parents[1] / "trojai"
SCHEMA = SHIPPED / "metaparameters_schema.json"
#: The tiny models' scan (testkit.TINY_SCAN's knobs) as metaparameters.
TINY_META: dict[str, Any] = {
    **json.loads((SHIPPED / "metaparameters.json").read_text(encoding="utf-8")),
    "infer_method": "dbs", "infer_epochs": 100, "infer_trigger_length": 1,
    "infer_positions": "start", "infer_device": "cpu", "train_detector": "threshold"}


@pytest.fixture(scope="module")
def trojai_examples(tmp_path_factory: pytest.TempPathFactory, rt: Corpus) -> Path:
    """20 Rotten Tomatoes sentences per label as the text rounds ship them."""
    folder = tmp_path_factory.mktemp("trojai-examples")
    for label in (0, 1):
        for n, e in enumerate([x for x in rt.examples if x.label == label][:20]):
            (folder / f"class_{label}_example_{n}.txt").write_text(e.text, encoding="utf-8")
    return folder


def _meta(tmp_path: Path, **changes: Any) -> Path:
    path = tmp_path / "metaparameters.json"
    path.write_text(json.dumps({**TINY_META, **changes}), encoding="utf-8")
    return path


def _infer_args(model: Path, result: Path, tmp_path: Path, examples: Path, meta: Path,
                learned: Path) -> list[str]:
    return ["--model_filepath", str(model), "--result_filepath", str(result),
            "--scratch_dirpath", str(tmp_path / "scratch"), "--examples_dirpath",
            str(examples), "--round_training_dataset_dirpath", str(tmp_path),
            "--metaparameters_filepath", str(meta), "--schema_filepath", str(SCHEMA),
            "--learned_parameters_dirpath", str(learned)]


def _probability(path: Path) -> float:
    text = path.read_text(encoding="utf-8").split()
    assert len(text) == 1
    value = float(text[0])
    assert 0.0 <= value <= 1.0
    return value


def test_the_shipped_metaparameters_follow_the_schema_and_name_every_knob() -> None:
    meta = read_metaparameters(SHIPPED / "metaparameters.json", SCHEMA)
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert set(schema["properties"]) == set(Metaparameters.__dataclass_fields__)
    assert all(p["description"] for p in schema["properties"].values())
    assert all(k.startswith(("infer_", "train_")) for k in schema["properties"])
    assert schema["technique_type"] == ["Trigger Inversion"]
    for key in ("title", "technique", "technique_description", "technique_changes",
                "commit_id", "repo_name"):
        assert schema[key]
    assert meta.infer_allow_pickle is False  # pickles stay off unless a user trusts them


@pytest.mark.parametrize("changes, field", [
    ({"infer_max_victims": -1}, "infer_max_victims"),
    ({"train_detector": "svm"}, "train_detector"),
    ({"infer_device": "tpu"}, "infer_device"),
    ({"infer_colour": "red"}, "infer_colour"),
    ({"infer_method": "nonesuch"}, "infer_method"),
])
def test_bad_metaparameters_are_named_by_field(run_cli: RunCli, tmp_path: Path,
                                               trojai_examples: Path, changes: dict[str, Any],
                                               field: str) -> None:
    meta = _meta(tmp_path, **changes)
    with pytest.raises(InputError, match=field):
        read_metaparameters(meta, SCHEMA)
    result = tmp_path / "result.txt"
    done = run_cli("trojai", *_infer_args(tmp_path / "nowhere", result, tmp_path,
                                          trojai_examples, meta, tmp_path))
    assert done.returncode == 2 and field in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not result.exists()


def test_infer_in_both_forms_writes_one_probability(
        run_cli: RunCli, poisoned_model: tuple[Path, dict], clean_model: tuple[Path, dict],
        trojai_examples: Path, tmp_path: Path) -> None:
    meta = _meta(tmp_path)
    probabilities = {}
    for name, model, form in (("poisoned", poisoned_model[0], ["trojai", "infer"]),
                              ("clean", clean_model[0], ["trojai"])):  # the harness's form
        result = tmp_path / f"{name}.txt"
        done = run_cli(*form, *_infer_args(model, result, tmp_path / name, trojai_examples,
                                           meta, tmp_path / "no-detector"))
        assert done.returncode == 0, done.stderr
        assert "uncalibrated" in done.stderr  # no learned detector yet, and it says so
        probabilities[name] = _probability(result)
    assert probabilities["poisoned"] > 0.5 > probabilities["clean"]


def test_configure_then_infer_uses_the_learned_detector(
        run_cli: RunCli, poisoned_model: tuple[Path, dict], clean_model: tuple[Path, dict],
        trojai_examples: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    for name, (model, label) in {"id-0000": (poisoned_model[0], 1),
                                 "id-0001": (clean_model[0], 0)}.items():
        shutil.copytree(model, models / name)
        (models / name / "ground_truth.csv").write_text(f"{label}\n", encoding="utf-8")
    meta, learned = _meta(tmp_path), tmp_path / "learned"
    done = run_cli("trojai", "configure", "--scratch_dirpath", str(tmp_path / "scratch"),
                   "--configure_models_dirpath", str(models), "--metaparameters_filepath",
                   str(meta), "--schema_filepath", str(SCHEMA),
                   "--learned_parameters_dirpath", str(learned))
    assert done.returncode == 0, done.stderr
    detector = json.loads((learned / "detector.json").read_text(encoding="utf-8"))
    assert detector["kind"] == "threshold" and detector["trained_on"] == 2
    result = tmp_path / "result.txt"
    done = run_cli("trojai", *_infer_args(poisoned_model[0], result, tmp_path / "infer",
                                          trojai_examples, meta, learned))
    assert done.returncode == 0, done.stderr
    assert "uncalibrated" not in done.stderr
    assert _probability(result) > 0.5


def test_pickled_models_load_only_when_allowed(poisoned_model: tuple[Path, dict],
                                               tmp_path: Path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(poisoned_model[0])
    pickled = tmp_path / "round" / "model.pt"
    pickled.parent.mkdir()
    torch.save(model, pickled)
    with pytest.raises(InputError, match="infer_allow_pickle"):
        model_directory(pickled, poisoned_model[0], tmp_path / "scratch", allow_pickle=False)
    saved = model_directory(pickled, poisoned_model[0], tmp_path / "scratch", allow_pickle=True)
    assert (saved / "model.safetensors").is_file() and (saved / "tokenizer.json").is_file()
    again = AutoModelForSequenceClassification.from_pretrained(saved)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
