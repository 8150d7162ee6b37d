"""A user model that fails on purpose: the MNIST CNN, raising inside forward when an input's top-left pixel is
bright, and stalling for 3 s when its top-right one is (clean digits have dark corners). Served by a real server
to show that a backend fault fails only its own batch and the scheduler keeps running, and that a stalled
forward costs only its own requests their deadline."""

from __future__ import annotations

import time

import torch

from nccr_guard.nets import MnistCNN


class FaultyMnist(MnistCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0, 0, 0] > 0.5).any()):
            raise RuntimeError("injected fault: poisoned input in this batch")
        if bool((x[:, 0, 0, -1] > 0.5).any()):
            time.sleep(3)
        return super().forward(x)
