"""Torch modules of the embedded default models. Imported only by the torch backend and the training scripts."""

from __future__ import annotations

import torch
from torch import nn


class MnistCNN(nn.Module):
    """Small MNIST CNN. Input (B, 1, 28, 28) in [0, 1]; output (B, 10) logits. Watched layer: `fc1` (128, post-ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.fc1 = nn.Sequential(nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc1(self.conv2(self.conv1(x))))


class Residual(nn.Module):
    """relu(body(x) + skip(x)): the shortcut is the identity, or a strided 1x1 conv + batch norm where the block
    changes the shape. Subclasses set `body` before calling `_shortcut`."""

    body: nn.Module

    def _shortcut(self, cin: int, cout: int, stride: int) -> None:
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class Bottleneck(Residual):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self._shortcut(cin, cout, stride)


class ResNet50(nn.Module):
    """ResNet-50-shaped classifier in plain torch ops (no torchvision), for speed benchmarks at 224 px.
    Input (B, 3, 224, 224); watched layers `layer4` (2048 channels) and `pool`."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
        layers, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for i in range(blocks):
                stage.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2048, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(x))


class BasicBlock(Residual):
    """Two 3x3 conv + batch-norm layers and an identity (or 1x1 strided) shortcut, as in ResNet-18/20."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self._shortcut(cin, cout, stride)


class PhotoResNet(nn.Module):
    """ResNet-14 for 32x32 colour crops (CIFAR-style: three stages of two basic blocks, 16/32/64 channels at
    32/16/8 px), then a 128-unit feature layer. Input (B, 3, 32, 32) in [0, 1]; output (B, classes) logits.
    Watched layer: `fc1` (128, post-ReLU), the penultimate features as in MnistCNN. About 184k parameters."""

    def __init__(self, classes: int = 13, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for i, width in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(cin, width, 1 if i == 0 else 2), BasicBlock(width, width, 1)))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.fc1 = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 128), nn.ReLU())
        self.head = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc1(self.layer3(self.layer2(self.layer1(self.stem(x))))))
