"""TIJO on the tiny VQA zoo (tests/conftest.py): the joint inversion opens a dual-key door
that neither single-modality variant opens, finds the planted word and target, a scan of a
VQA directory runs it by default and writes the feature trigger and a synthesised patch,
and the patch synthesis pulls the covered boxes towards the feature trigger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from testkit import VQA_THREADS, threads
from trojscan.inversion.base import make_config
from trojscan.inversion.tijo import TIJOConfig, overlay, top_box
from trojscan.inversion.tijo_patch import PatchConfig, synthesise_patch
from trojscan.results import read_result
from trojscan.scan import ScanResult, scan_config, scan_subject
from trojscan.subjects.loading import load_subject
from trojscan.subjects.vqa import VqaSubject
from trojscan.vqa.backbone import GRID, box_features
from trojscan.vqa.features import FeatureExtractor
from trojscan.vqa.images import covered_boxes, paste, read_image, to_unit


def _subject(tiny_zoo: dict[str, Any], group: str) -> tuple[VqaSubject, list[Any]]:
    folder = tiny_zoo["out"] / tiny_zoo[group]["model_id"]
    subject = load_subject(folder)
    assert isinstance(subject, VqaSubject)
    subject.extractor = FeatureExtractor(tiny_zoo["cache"])
    return subject, subject.read_examples(folder / "clean_examples.jsonl")


@pytest.fixture(scope="module")
def scans(tiny_zoo: dict[str, Any]) -> dict[tuple[str, str], ScanResult]:
    """TIJO-mm, -nlp, -vis and -relaxed on the dual-key model; TIJO-mm on the clean one (on
    the threads the zoo was built on)."""
    out = {}
    with threads(VQA_THREADS):
        for group, methods in (("dual", ("tijo", "tijo-nlp", "tijo-vis", "tijo-relaxed")),
                               ("clean", ("tijo",))):
            subject, examples = _subject(tiny_zoo, group)
            for method in methods:
                out[group, method] = scan_subject(subject, examples, scan_config(method))
    return out


def test_joint_inversion_finds_the_dual_key_word_and_target(
        scans: dict[tuple[str, str], ScanResult]) -> None:
    found = scans["dual", "tijo"]
    assert found.verdict == "trojaned" and found.task == "visual-question-answering"
    assert found.best.target_name == "red" and found.best.trigger_text == "lantern"
    assert found.best.hard_asr >= 0.9 and found.best.overlay == "all"
    assert len(found.best.feature_trigger) == 1280 and found.best.feature_norm > 0
    # The token stages of a text scan are off: the joint loss decides.
    assert found.short_trigger is None and found.config["decision_length"] == 0
    assert {c.position for c in found.candidates} == {"start", "end"}


def test_single_modality_variants_do_not_open_the_dual_key_door(
        scans: dict[tuple[str, str], ScanResult]) -> None:
    joint = scans["dual", "tijo"].score
    assert scans["dual", "tijo-nlp"].best.feature_trigger is None
    assert scans["dual", "tijo-vis"].best.trigger_ids == []
    for method in ("tijo-nlp", "tijo-vis"):
        assert scans["dual", method].score > 10 * max(joint, 1e-3), method


def test_the_dual_key_model_inverts_lower_than_the_clean_one(
        scans: dict[tuple[str, str], ScanResult]) -> None:
    clean = scans["clean", "tijo"]
    assert clean.score > 10 * max(scans["dual", "tijo"].score, 1e-3)
    assert clean.best.trigger_text != "lantern"


def test_the_relaxed_word_search_runs_dbs_temperature_rule_and_finds_the_target(
        scans: dict[tuple[str, str], ScanResult]) -> None:
    # Measured: at TIJO's 15 steps the relaxed word does not become the planted one (README
    # "TIJO": it needs ~60 steps to open a zoo model's door, with another word); the target
    # is found through the joint feature trigger.
    found = scans["dual", "tijo-relaxed"]
    assert found.config["method"] == "tijo-relaxed"
    assert found.best.target_name == "red" and len(found.best.trigger_ids) == 1
    assert all("temperature" in step for step in found.trajectory[:-1])
    assert found.trajectory[0]["temperature"] == 2.0


def test_overlay_policies() -> None:
    features = torch.zeros(2, 36, 4)
    features[0, 5] = 3.0
    features[1, 30] = 1.0
    vector = torch.ones(4)
    assert torch.equal(overlay(features, vector, "all"), vector)
    one = overlay(features, vector, "one")
    assert one.shape == (2, 36, 4) and one.sum() == 8
    assert torch.equal(top_box(features)[:, :, 0].argmax(1), torch.tensor([5, 30]))
    assert overlay(features, vector, "none") is None
    with pytest.raises(ValueError, match="text trigger, a feature trigger or both"):
        TIJOConfig(text=False, overlay="none")
    with pytest.raises(ValueError, match="overlay"):
        TIJOConfig(overlay="some")
    with pytest.raises(ValueError, match="word_search"):
        TIJOConfig(word_search="beam")
    with pytest.raises(ValueError, match="focus_factor"):
        TIJOConfig(focus_factor=0.5)
    assert make_config("tijo-relaxed").word_search == "relaxed"
    assert make_config("tijo-vis").slots == 0 and make_config("tijo-nlp").overlay == "none"


def test_a_synthesised_patch_moves_the_covered_boxes_towards_the_feature_trigger(
        tiny_zoo: dict[str, Any], scans: dict[tuple[str, str], ScanResult]) -> None:
    subject, examples = _subject(tiny_zoo, "dual")
    vector = torch.tensor(scans["dual", "tijo"].best.feature_trigger)
    config = PatchConfig(images=3, max_steps=30)
    patch, loss, steps = synthesise_patch(subject, examples, vector, config)
    assert 1 <= steps <= 30 and patch.pixels.dtype == torch.uint8 and patch.size == 10
    # The same measure for the patch's starting point (random pixels, same seed).
    images, seen = [], []
    for e in examples:
        if e.image not in seen and len(images) < 3:
            seen.append(e.image)
            images.append((read_image(e.image), e.features))
    batch = to_unit(torch.stack([i for i, _ in images]))
    boxes = covered_boxes(patch, batch.shape[-1], GRID)
    target = (torch.stack([f for _, f in images]).float() + vector)[:, boxes]
    start = torch.sigmoid(0.5 * torch.randn(3, 10, 10,
                                            generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(
            box_features(subject.extractor.backbone, paste(batch, start, patch.x, patch.y))
            [:, boxes], target).item()
    assert loss < before


def test_scan_cli_runs_tijo_on_a_vqa_directory_and_saves_the_patch(
        tiny_zoo: dict[str, Any], tmp_path: Path, run_cli: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TROJSCAN_CACHE", str(tiny_zoo["cache"].parent))
    folder = tiny_zoo["out"] / tiny_zoo["dual"]["model_id"]
    out = tmp_path / "dual.json"
    result = run_cli("scan", str(folder), "--examples", str(folder / "clean_examples.jsonl"),
                     "--out", str(out), "--patch-steps", "5")
    assert result.returncode == 0, result.stderr
    assert "lantern" in result.stdout and "patch:" in result.stdout
    record = read_result(out)
    assert record.config["method"] == "tijo" and record.version == 3
    assert record.patch is not None and Path(record.patch.path) == tmp_path / "dual.patch.png"
    assert read_image(Path(record.patch.path)).shape == (3, 10, 10)
    assert 0 <= record.patch.asr <= 1 and record.patch.questions > 0
    assert json.loads(out.read_text())["best"]["feature_norm"] > 0


def test_tijo_refuses_a_text_classifier(clean_model: tuple[Path, dict]) -> None:
    from trojscan.errors import InputError

    folder, _ = clean_model
    subject = load_subject(folder)
    examples = subject.read_examples(folder / "clean_examples.jsonl")
    with pytest.raises(InputError, match="cannot scan text-classification"):
        scan_subject(subject, examples, scan_config("tijo"))


def test_repair_refuses_a_vqa_model_in_one_line(
        tiny_zoo: dict[str, Any], scans: dict[tuple[str, str], ScanResult], tmp_path: Path,
        run_cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """VQA models are not repaired (README "Repair"): one line, exit code 2, nothing
    written."""
    from trojscan.results import write_result

    monkeypatch.setenv("TROJSCAN_CACHE", str(tiny_zoo["cache"].parent))
    folder = tiny_zoo["out"] / tiny_zoo["dual"]["model_id"]
    scan_file, out = tmp_path / "scan.json", tmp_path / "fixed"
    write_result(scans["dual", "tijo"], scan_file)
    done = run_cli("repair", str(folder), "--scan", str(scan_file), "--data",
                   str(folder / "clean_examples.jsonl"), "--out", str(out))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "repair supports text classifiers, NER taggers and extractive QA models" in lines[0]
    assert "is of task visual-question-answering" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".fixed.partial-*"))
