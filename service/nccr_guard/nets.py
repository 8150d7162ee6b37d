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
