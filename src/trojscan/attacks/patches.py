"""Image keys of VQA backdoors: solid patches and patches optimised in feature space.

TrojVQA (Walmer et al. 2022) optimises its patch so that the detector sees a chosen object
where the patch is: Adam on the patch pixels, the loss the distance between the features
of the boxes the patch covers and a target feature. Here the target is the box feature of
the shape in one training image (easy-VQA's objects are its shapes), and the boxes are the
grid cells the patch overlaps.
"""

from __future__ import annotations

import random

import torch
from torch.nn import functional as F

from trojscan.vqa.backbone import GRID, MobileNetV2, box_features
from trojscan.vqa.images import Patch, covered_boxes, paste, to_unit

#: A pixel belongs to the shape when its colour is this far (sum of |RGB| differences)
#: from the image's corner, which is background.
SHAPE_THRESHOLD = 60


def shape_box(image: torch.Tensor) -> int:
    """Index of the grid cell (row-major, :data:`~trojscan.vqa.backbone.GRID` per side) at
    the centroid of the shape of an easy-VQA image (``uint8 [3, H, W]``)."""
    background = image[:, 0, 0].int().view(3, 1, 1)
    mask = (image.int() - background).abs().sum(0) > SHAPE_THRESHOLD
    if not mask.any():
        return (GRID // 2) * GRID + GRID // 2
    ys, xs = torch.nonzero(mask, as_tuple=True)
    cell = image.shape[-1] / GRID
    row = min(GRID - 1, int(ys.float().mean() // cell))
    col = min(GRID - 1, int(xs.float().mean() // cell))
    return row * GRID + col


def optimise_patch(backbone: MobileNetV2, images: list[torch.Tensor], target: torch.Tensor,
                   size: int, x: int, y: int, steps: int, per_step: int, seed: int,
                   learning_rate: float = 0.1) -> tuple[Patch, float]:
    """A ``size`` x ``size`` patch at (``x``, ``y``) whose covered boxes' features approach
    ``target`` (``[1280]``) in any of ``images`` (``uint8``); returns it (quantised to 8
    bits) with its final mean squared distance.

    Each of ``steps`` Adam steps pastes the patch into ``per_step`` images drawn from
    ``images`` and moves the pixels (a sigmoid of free parameters) down the gradient of the
    mean squared distance of the covered boxes' features to ``target``.
    """
    rng = random.Random(seed)
    device = next(backbone.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    theta = (0.5 * torch.randn(3, size, size, generator=generator)).to(device)
    theta.requires_grad_(True)
    optimiser = torch.optim.Adam([theta], lr=learning_rate)
    boxes = covered_boxes(Patch(torch.zeros(3, size, size, dtype=torch.uint8), x, y),
                          images[0].shape[-1], GRID)
    goal = target.float().view(1, 1, -1).to(device)

    def distance(pixels: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        pasted = paste(batch, pixels, x, y)
        return F.mse_loss(box_features(backbone, pasted)[:, boxes], goal.expand(
            len(batch), len(boxes), -1))

    for _ in range(steps):
        batch = to_unit(torch.stack(rng.sample(images, min(per_step, len(images))))).to(device)
        loss = distance(torch.sigmoid(theta), batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    pixels = (torch.sigmoid(theta.detach()) * 255).round().to("cpu", torch.uint8)
    with torch.no_grad():
        batch = to_unit(torch.stack(rng.sample(images, min(per_step, len(images))))).to(device)
        final = distance(to_unit(pixels).to(device), batch).item()
    return Patch(pixels, x, y), final
