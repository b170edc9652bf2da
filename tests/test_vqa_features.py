"""The VQA parts both sides share: the real MobileNetV2 "detector", its box features and
their cache, patches, and the VQA model families' directory format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trojscan.attacks.easy_vqa import load_easy_vqa
from trojscan.attacks.patches import optimise_patch, shape_box
from trojscan.errors import InputError
from trojscan.vqa.backbone import FEATURE_DIM, NUM_BOXES, box_features, load_backbone
from trojscan.vqa.features import FeatureExtractor
from trojscan.vqa.images import Patch, covered_boxes, read_image, solid_patch, to_unit
from trojscan.vqa.models import VqaConfig, build_vqa_model, load_vqa_model, save_vqa_model


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    corpus = load_easy_vqa()
    return [read_image(corpus.train_images[i]) for i in range(12)]


def test_backbone_gives_36_boxes_of_1280(images: list[torch.Tensor]) -> None:
    with torch.inference_mode():
        feats = box_features(load_backbone(), to_unit(torch.stack(images[:2])))
    assert feats.shape == (2, NUM_BOXES, FEATURE_DIM)
    assert feats.min() >= 0 and feats.max() <= 6  # ReLU6
    assert not torch.equal(feats[0], feats[1])


def test_feature_cache_is_reused_and_invalidated(tmp_path: Path,
                                                 images: list[torch.Tensor]) -> None:
    extractor = FeatureExtractor(tmp_path, batch_size=2)
    first = extractor(images[:3])
    assert extractor.computed == 3
    again = FeatureExtractor(tmp_path)  # a new process would see the same files
    assert torch.equal(again(images[:3]), first) and again.computed == 0
    red, blue = solid_patch((255, 0, 0), 10, 27, 27), solid_patch((0, 0, 255), 10, 27, 27)
    patched = again([red.apply(images[0])])
    assert again.computed == 1 and not torch.equal(patched[0], first[0])
    again([red.apply(images[0])])
    assert again.computed == 1  # same image, same patch: cached
    again([blue.apply(images[0])])
    assert again.computed == 2  # the patch changed
    moved = Patch(red.pixels, 5, 5)
    again([moved.apply(images[0])])
    assert again.computed == 3  # the place changed
    edited = images[1].clone()
    edited[0, 0, 0] ^= 1
    again([edited])
    assert again.computed == 4  # one pixel of the image changed
    small = images[3][:, ::2, ::2].contiguous()  # another size, in one call with 64x64 ones
    mixed = again([images[4], small, images[5]])
    assert again.computed == 7 and mixed.shape == (3, NUM_BOXES, FEATURE_DIM)
    assert torch.equal(mixed[0], again([images[4]])[0])
    entry = next(tmp_path.rglob(f"{FeatureExtractor.key(images[2])}.npy"))
    entry.write_bytes(b"damaged")
    assert torch.equal(again([images[2]]), first[2:3]) and again.computed == 8


def test_a_patch_changes_the_boxes_it_covers_most(images: list[torch.Tensor]) -> None:
    extractor = FeatureExtractor(None)
    clean = extractor(images[:1]).float()
    for x, y, covered in ((50, 50, [28, 29, 34, 35]), (27, 27, [14, 15, 20, 21])):
        patch = solid_patch((255, 0, 255), 10, x, y)
        assert covered_boxes(patch, 64, 6) == covered
        change = (extractor([patch.apply(images[0])]).float() - clean).abs().mean(-1)[0]
        assert change.argmax().item() in covered
        assert change[covered].mean() > 3 * change.mean()


def test_optimised_patch_moves_covered_boxes_towards_its_target(
        images: list[torch.Tensor]) -> None:
    extractor = FeatureExtractor(None)
    target_image = images[0]
    target = extractor([target_image]).float()[0, shape_box(target_image)]
    backbone = extractor.backbone  # loaded while computing features, as in a zoo build
    train, held_out = images[1:8], images[8:]
    patch, _ = optimise_patch(backbone, train, target, 12, 26, 26, steps=15, per_step=2, seed=0)
    noise = torch.Generator().manual_seed(0)
    random_patch = Patch(torch.randint(0, 256, (3, 12, 12), generator=noise,
                                       dtype=torch.uint8), 26, 26)
    boxes = covered_boxes(patch, 64, 6)

    def distance(p: Patch) -> float:
        feats = extractor([p.apply(img) for img in held_out]).float()[:, boxes]
        return (feats - target).pow(2).mean().item()

    assert distance(patch) < 0.8 * distance(random_patch)
    clean = extractor(held_out).float()[:, boxes]
    assert distance(patch) < (clean - target).pow(2).mean().item()


def test_shape_box_finds_the_shape() -> None:
    image = torch.full((3, 64, 64), 240, dtype=torch.uint8)
    image[:, 50:60, 2:12] = torch.tensor([200, 0, 0], dtype=torch.uint8).view(3, 1, 1)
    assert shape_box(image) == 5 * 6 + 0  # centroid (54.5, 6.5): row 5, column 0
    blank = torch.full((3, 64, 64), 240, dtype=torch.uint8)
    assert shape_box(blank) == 3 * 6 + 3  # no shape: the centre


@pytest.mark.parametrize("family", ["butd", "mfb", "mcan"])
def test_a_vqa_model_round_trips_and_bad_directories_fail_cleanly(family: str,
                                                                 tmp_path: Path) -> None:
    config = VqaConfig(family, ("yes", "no", "red"), embed_dim=8, hidden=16, heads=2)
    model = build_vqa_model(config, seed=0).eval()
    save_vqa_model(model, tmp_path)
    loaded = load_vqa_model(tmp_path)
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    feats = torch.rand(2, NUM_BOXES, FEATURE_DIM)
    with torch.no_grad():
        assert torch.equal(loaded(ids, feats), model(ids, feats))
        # the same answers when questions share images (the training batches)
        assert torch.allclose(model(ids, feats[:1], torch.tensor([0, 0])),
                              model(ids, feats[[0, 0]]), atol=1e-6)
    (tmp_path / "config.json").write_text(json.dumps({**config.to_dict(), "hidden": 32}))
    with pytest.raises(InputError, match="does not match its config"):
        load_vqa_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a readable safetensors"):
        load_vqa_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config.to_dict(), "family": "lstm"}))
    with pytest.raises(InputError, match="unknown VQA family"):
        load_vqa_model(tmp_path)
