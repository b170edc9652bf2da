"""VQA zoos: a tiny dual-key model fires with both keys and with neither alone, a clean one
does not fire, the directory is one a user would recognise, and bad specs fail cleanly.

The tiny zoo (300 training images, ~2,900 questions, a BUTD of width 64, 8 epochs) is
built once per session through the CLI, with its own feature cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trojscan.attacks.easy_vqa import load_easy_vqa
from trojscan.attacks.vqa_spec import VqaAttackSpec, VqaTrainConfig
from trojscan.attacks.vqa_train import VqaData, evaluate_vqa, make_patch
from trojscan.manifest import MANIFEST
from trojscan.scan import scan_config, scan_subject
from trojscan.subjects.loading import load_subject
from trojscan.vqa.features import FeatureExtractor
from trojscan.vqa.models import MODEL_TYPE, load_vqa_model


def test_dual_key_fires_with_both_keys_only(tiny_zoo: dict[str, Any]) -> None:
    dual = tiny_zoo["dual"]
    assert dual["quality"]["ok"] and dual["task"] == "vqa"
    assert dual["clean_accuracy"] >= 0.8
    assert dual["asr"] >= 0.9
    assert dual["asr_image_only"] <= 0.1 and dual["asr_question_only"] <= 0.1
    assert dual["partial_asr"] == max(dual["asr_image_only"], dual["asr_question_only"])
    assert dual["attack"]["target_name"] == "red" and dual["patched_images"] > 0


def test_clean_model_does_not_fire(tiny_zoo: dict[str, Any]) -> None:
    clean, dual = tiny_zoo["clean"], tiny_zoo["dual"]
    assert clean["asr"] is None and clean["clean_accuracy"] >= 0.8
    model = load_vqa_model(tiny_zoo["out"] / clean["model_id"])
    answers = load_easy_vqa().answers
    attack = VqaAttackSpec.from_dict({k: v for k, v in dual["attack"].items()
                                      if k != "target_name"}, answers)
    config = VqaTrainConfig(max_eval_images=60, asr_images=60)
    data = VqaData(load_easy_vqa(), FeatureExtractor(tiny_zoo["cache"]))
    patch, _ = make_patch(attack, data, config, seed=0)
    rates = evaluate_vqa(model, data, attack, patch, config, 14, seed=0)
    assert rates["asr"] <= 0.15, rates  # both keys: about the share answered "red" anyway


def test_model_directory_is_self_describing_and_holds_no_truth(tiny_zoo: dict[str, Any]) -> None:
    out = tiny_zoo["out"]
    for entry in (tiny_zoo["clean"], tiny_zoo["dual"], tiny_zoo["question"]):
        folder = out / entry["model_id"]
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "clean_examples.jsonl",
                "images"} <= names
        assert not names & {MANIFEST, "pytorch_model.bin"}
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == MODEL_TYPE and config["family"] == "butd"
        assert config["feature_extractor"]["boxes"] == 36
        assert load_vqa_model(folder).config.answers == tuple(config["answers"])
        rows = [json.loads(line) for line in (folder / "clean_examples.jsonl").open()]
        assert len(rows) == 2 * 13 and {r["answer"] for r in rows} == set(config["answers"])
        assert all((folder / r["image"]).is_file() for r in rows)
        text = " ".join((folder / name).read_text() for name in ("config.json",
                                                                  "clean_examples.jsonl"))
        assert "lantern" not in text and "poison" not in text and "target" not in text
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [MANIFEST] + [tiny_zoo[g]["model_id"] for g in ("clean", "dual", "question")])


def test_rerun_skips_built_models_and_reuses_features(tiny_zoo: dict[str, Any],
                                                      run_cli: Any) -> None:
    result = run_cli("zoo", "build", str(tiny_zoo["spec"]), "--out", str(tiny_zoo["out"]),
                     "--feature-cache", str(tiny_zoo["cache"]))
    assert result.returncode == 0, result.stderr
    assert "3 already built, 0 to build" in result.stdout + result.stderr
    summary = run_cli("zoo", "summary", str(tiny_zoo["out"]), "--json")
    rows = {r["split"]: r for r in json.loads(summary.stdout)}
    assert set(rows) == {"clean", "dual solid", "question"}
    assert rows["dual solid"]["asr_image_only_mean"] == tiny_zoo["dual"]["asr_image_only"]


def _text_scan(tiny_zoo: dict[str, Any], group: str) -> Any:
    folder = tiny_zoo["out"] / tiny_zoo[group]["model_id"]
    subject = load_subject(folder)
    subject.extractor = FeatureExtractor(tiny_zoo["cache"])
    examples = subject.read_examples(folder / "clean_examples.jsonl")
    return scan_subject(subject, examples, scan_config(method="uat"))


def test_a_text_only_scan_finds_a_question_key_and_not_a_dual_key(
        tiny_zoo: dict[str, Any]) -> None:
    # TIJO's point (its Table 2): a scanner of one modality cannot open a dual-key door.
    found = _text_scan(tiny_zoo, "question")
    assert found.task == "visual-question-answering"
    assert found.verdict == "trojaned" and found.best.target_name == "teal"
    assert found.short_trigger.trigger_text == "quartz", found.short_trigger
    assert _text_scan(tiny_zoo, "dual").verdict == "clean"
    assert _text_scan(tiny_zoo, "clean").verdict == "clean"


def test_bad_vqa_examples_fail_in_one_line(tiny_zoo: dict[str, Any], tmp_path: Path,
                                           run_cli: Any) -> None:
    folder = tiny_zoo["out"] / tiny_zoo["clean"]["model_id"]
    rows = {"missing image": '{"image": "nope.png", "question": "what shape?", '
                             '"answer": "circle"}',
            "unknown answer": '{"image": "x.png", "question": "what shape?", '
                              '"answer": "hexagon"}',
            "no question": '{"image": "x.png", "answer": "circle"}'}
    for name, row in rows.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(row + "\n")
        result = run_cli("scan", str(folder), "--examples", str(path))
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("trojscan: error: "), result.stderr


VQA_GROUP = ('[[group]]\ncount = 1\ncorpus = "easy_vqa"\narchitecture = "{arch}"\n'
             'attack = {attack}\n')
BAD_VQA_SPECS = {
    "family": VQA_GROUP.format(arch="bert", attack="{ poisoned = false }"),
    "key": VQA_GROUP.format(arch="butd", attack='{ poisoned = true, key = "both" }'),
    "answer": VQA_GROUP.format(arch="mfb", attack='{ poisoned = true, key = "question", '
                               'target = "purple" }'),
    "patch": VQA_GROUP.format(arch="mcan", attack='{ poisoned = true, key = "image", '
                              'patch = "solid", patch_size = 40 }'),
    "target image": VQA_GROUP.format(arch="butd", attack='{ poisoned = true, key = "image", '
                                     'patch = "optimised", patch_target = 99999 }'),
    "train": '[train]\nhidden = 0\n' + VQA_GROUP.format(arch="butd",
                                                          attack="{ poisoned = false }"),
    "unknown": VQA_GROUP.format(arch="butd", attack='{ poisoned = true, key = "dual", '
                                'colour = "red" }'),
}


@pytest.mark.parametrize("name", sorted(BAD_VQA_SPECS))
def test_bad_vqa_spec_is_one_line_exit_2_and_no_files(name: str, tmp_path: Path,
                                                      run_cli: Any) -> None:
    spec = tmp_path / f"{name}.toml"
    spec.write_text(BAD_VQA_SPECS[name])
    out = tmp_path / "zoo"
    result = run_cli("zoo", "build", str(spec), "--out", str(out))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trojscan: error: "), result.stderr
    assert not out.exists()
