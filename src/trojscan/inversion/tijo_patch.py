"""TIJO's trigger patch generation (Sur et al., ICCV 2023, Section 3.4 and 4.4): an image
patch synthesised from the feature trigger ``f_adv`` that TIJO inverted.

"We overlay f_adv on f_x and then iteratively optimize p_adv to minimize the MSE loss between
f_{x_p} and B(f_x, f_adv)": the support images' clean box features ``f_x`` plus the feature
trigger are the target, the box features of the same images with the patch stamped on them
``f_{x_p}`` are pulled towards it, "only those boxes ... that have an overlap with the image
region containing the patch" count, and the patch is pasted at the centre. The optimiser is
the paper's: "Adam optimizer with a learning rate of 0.03, and betas as (0.5, 0.9) and ...
early stopping with a patience of 20". The pixels are a sigmoid of free parameters (so they
stay in [0, 1]) and the patch is quantised to 8 bits, which is what a PNG holds.

The synthesised patch is then measured as pixels, through the detector, on clean examples the
inversion did not use: with the inverted text trigger (the attack success rate of the two
recovered keys together), and with each alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trojscan.subjects.base import Candidate
from trojscan.subjects.vqa import VqaExample, VqaSubject
from trojscan.vqa.backbone import GRID, box_features
from trojscan.vqa.images import Patch, covered_boxes, paste, read_image, to_unit


@dataclass(frozen=True)
class PatchConfig:
    """How a patch is synthesised from a feature trigger.

    Attributes:
        size: the patch's side in pixels, pasted at the centre of the image (the paper: 64
            px at the centre of images of some 600 px, a tenth of the side as TrojVQA's
            patches; easy-VQA images are 64 px and the zoo's patches 8-12 px).
        learning_rate, betas: Adam's ("a learning rate of 0.03, and betas as (0.5, 0.9)").
        patience: steps without a lower loss before it stops ("early stopping with a
            patience of 20 epoch").
        max_steps: a cap on the steps (the paper gives none; each step is a forward and
            backward pass of the detector over ``images`` images, about 0.1 s per image on
            2 CPU cores).
        images: support images the patch is optimised on ("only over the clean image from
            the support set"): the first this many distinct images of the inversion's
            victims.
        seed: seeds the patch's initial pixels.
    """

    size: int = 10
    learning_rate: float = 0.03
    betas: tuple[float, float] = (0.5, 0.9)
    patience: int = 20
    max_steps: int = 150
    images: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.size, self.patience, self.max_steps, self.images) < 1:
            raise ValueError("size, patience, max_steps and images must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be > 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Synthesis:
    """A synthesised patch and how it did.

    Attributes:
        patch: the patch (``uint8`` pixels and place).
        feature_loss: the final MSE on the covered boxes (support images).
        steps: optimisation steps run.
        asr, asr_patch_only, asr_text_only: share of the measured examples answered with the
            target with the patch and the text trigger, the patch alone, the text alone.
        questions: examples measured.
        held_out: whether they were held out of the inversion.
        seconds: wall time.
    """

    patch: Patch
    feature_loss: float
    steps: int
    asr: float
    asr_patch_only: float
    asr_text_only: float
    questions: int
    held_out: bool
    seconds: float


def synthesise_patch(subject: VqaSubject, support: Sequence[VqaExample],
                     feature_trigger: torch.Tensor, config: PatchConfig) -> tuple[Patch, float,
                                                                                  int]:
    """Optimise a patch so that the support images' covered boxes, patched, have the clean
    features plus ``feature_trigger`` ((D,) or (boxes, D), as TIJO's overlay added it).
    Returns (the patch quantised to 8 bits, its final feature MSE, steps run)."""
    backbone = subject.extractor.backbone
    device = next(backbone.parameters()).device
    images, seen = [], set()
    for example in support:
        if example.image not in seen and len(images) < config.images:
            seen.add(example.image)
            images.append((read_image(example.image), example.features))
    pixels = torch.stack([i for i, _ in images])
    side = pixels.shape[-1]
    x = y = (side - config.size) // 2
    boxes = covered_boxes(Patch(torch.zeros(3, config.size, config.size, dtype=torch.uint8),
                                x, y), side, GRID)
    clean = torch.stack([f for _, f in images]).to(device, torch.float32)
    target = (clean + feature_trigger.to(device))[:, boxes]
    batch = to_unit(pixels).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    theta = (0.5 * torch.randn(3, config.size, config.size, generator=generator)).to(device)
    theta.requires_grad_(True)
    optimiser = torch.optim.Adam([theta], lr=config.learning_rate, betas=config.betas)
    best, best_theta, waited, steps = float("inf"), theta.detach().clone(), 0, 0
    while steps < config.max_steps and waited < config.patience:
        loss = F.mse_loss(box_features(backbone, paste(batch, torch.sigmoid(theta), x, y))
                          [:, boxes], target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        steps += 1
        if loss.item() < best:
            best, best_theta, waited = loss.item(), theta.detach().clone(), 0
        else:
            waited += 1
    quantised = (torch.sigmoid(best_theta) * 255).round().to("cpu", torch.uint8)
    with torch.no_grad():
        final = F.mse_loss(box_features(backbone, paste(batch, to_unit(quantised).to(device),
                                                        x, y))[:, boxes], target).item()
    return Patch(quantised, x, y), final, steps


def patched(subject: VqaSubject, examples: Sequence[VqaExample],
            patch: Patch) -> list[VqaExample]:
    """``examples`` with ``patch`` stamped on their images and the box features of the
    patched images (through the subject's feature cache: a patched image is its own
    entry)."""
    order = list(dict.fromkeys(e.image for e in examples))
    stamped = [patch.apply(read_image(image)) for image in order]
    features = dict(zip(order, subject.extractor(stamped), strict=True))
    return [VqaExample(e.question, e.label, e.image, features[e.image]) for e in examples]


@torch.no_grad()
def attack_rate(subject: VqaSubject, candidate: Candidate, examples: Sequence[VqaExample],
                trigger_ids: Sequence[int]) -> float:
    """Share of ``examples`` the model answers with the candidate's target when the words
    ``trigger_ids`` are put at its position (none: the question as it is)."""
    batch = subject.batch([candidate], [examples], len(trigger_ids))
    ids = torch.tensor(list(trigger_ids), dtype=torch.long, device=subject.device)
    logits = subject.logits(batch, trigger_ids=ids)
    return (logits.argmax(-1) == batch.goals).float().mean().item()


def synthesise_and_measure(subject: VqaSubject, candidate: Candidate,
                           support: Sequence[VqaExample], held: Sequence[VqaExample],
                           trigger_ids: Sequence[int], feature_trigger: torch.Tensor,
                           config: PatchConfig) -> Synthesis:
    """:func:`synthesise_patch` on ``support``, then the patch's attack success rate with the
    text trigger ``trigger_ids``, the patch alone and the text alone on ``held`` (the
    candidate's victims the inversion did not use; the support itself when there are none,
    and the result says so)."""
    started = time.perf_counter()
    patch, loss, steps = synthesise_patch(subject, support, feature_trigger, config)
    measured = list(held) or list(support)
    stamped = patched(subject, measured, patch)
    return Synthesis(
        patch=patch, feature_loss=loss, steps=steps,
        asr=attack_rate(subject, candidate, stamped, trigger_ids),
        asr_patch_only=attack_rate(subject, candidate, stamped, ()),
        asr_text_only=attack_rate(subject, candidate, measured, trigger_ids),
        questions=len(measured), held_out=bool(held), seconds=time.perf_counter() - started)
