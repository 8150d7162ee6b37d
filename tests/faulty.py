"""A user model that fails on purpose: the MNIST CNN, raising inside forward when an input's top-left pixel is
bright (clean digits have dark corners). Served by a real server to show that a backend fault fails only its own
batch and the scheduler keeps running."""

from __future__ import annotations

import torch

from nccr_guard.nets import MnistCNN


class FaultyMnist(MnistCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0, 0, 0] > 0.5).any()):
            raise RuntimeError("injected fault: poisoned input in this batch")
        return super().forward(x)
