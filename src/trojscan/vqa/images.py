"""Images and patches as both sides of a VQA backdoor see them.

An image is a ``uint8`` tensor ``[3, H, W]`` (easy-VQA: 64 x 64 RGB PNGs). A patch is a
small ``uint8`` picture pasted over it at a fixed place: solid colour or optimised
pixels, quantised to 8 bits so that what a model was trained on is exactly what a PNG of
the patched image holds.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from trojscan.errors import InputError


def read_image(path: Path) -> torch.Tensor:
    """An RGB image file as ``uint8 [3, H, W]``; a missing or unreadable file is an
    :class:`InputError` naming it."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as exc:
        raise InputError(f"image {path} does not exist") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"image {path} is not a readable image: {exc}") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def png_bytes(image: torch.Tensor) -> bytes:
    """A ``uint8 [3, H, W]`` image encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image(image: torch.Tensor, path: Path) -> None:
    """Write a ``uint8 [3, H, W]`` image as PNG, atomically (a temporary file beside it,
    then renamed); a failure is an :class:`InputError` naming the file."""
    path = Path(path)
    part = path.with_name(f".{path.name}.part")
    try:
        part.write_bytes(png_bytes(image))
        part.replace(path)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise InputError(f"cannot write the image {path}: {exc.strerror or exc}") from exc


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` images -> float in [0, 1]."""
    return images.float() / 255.0


@dataclass(frozen=True)
class Patch:
    """``pixels`` (``uint8 [3, s, s]``) pasted with their top-left corner at (``x``, ``y``)."""

    pixels: torch.Tensor
    x: int
    y: int

    @property
    def size(self) -> int:
        """Side of the square patch in pixels."""
        return int(self.pixels.shape[-1])

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """A copy of ``images`` (``[3, H, W]`` or ``[B, 3, H, W]``) with the patch pasted."""
        out = images.clone()
        s = self.size
        if self.x < 0 or self.y < 0 or self.x + s > out.shape[-1] or self.y + s > out.shape[-2]:
            raise InputError(f"a {s}-pixel patch at ({self.x}, {self.y}) does not fit a "
                             f"{out.shape[-1]}x{out.shape[-2]} image")
        out[..., :, self.y:self.y + s, self.x:self.x + s] = self.pixels
        return out


def paste(images: torch.Tensor, pixels: torch.Tensor, x: int, y: int) -> torch.Tensor:
    """``images`` (``[B, 3, H, W]`` in [0, 1]) with ``pixels`` (``[3, s, s]`` in [0, 1])
    pasted at (``x``, ``y``); differentiable in ``pixels``, so that a patch can be optimised
    through the detector."""
    s = pixels.shape[-1]
    mask = torch.zeros(1, 1, *images.shape[-2:], device=images.device, dtype=images.dtype)
    mask[..., y:y + s, x:x + s] = 1.0
    canvas = torch.zeros_like(images)
    canvas[..., y:y + s, x:x + s] = pixels
    return images * (1 - mask) + canvas * mask


def solid_patch(colour: tuple[int, int, int], size: int, x: int, y: int) -> Patch:
    """A square of one RGB colour."""
    pixels = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, size, size)
    return Patch(pixels.contiguous(), x, y)


def covered_boxes(patch: Patch, image_size: int, grid: int) -> list[int]:
    """Indices (row-major) of the grid cells of an ``image_size`` image that the patch
    overlaps: the boxes whose features it changes most."""
    cell = image_size / grid
    s = patch.size
    rows = range(int(patch.y // cell), int(min(grid - 1, (patch.y + s - 1) // cell)) + 1)
    cols = range(int(patch.x // cell), int(min(grid - 1, (patch.x + s - 1) // cell)) + 1)
    return [r * grid + c for r in rows for c in cols]
