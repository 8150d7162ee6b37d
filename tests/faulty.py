"""A user model that fails on purpose: the MNIST CNN, raising inside forward when an input's top-left pixel is
bright, and stalling for 3 s when its top-right one is (clean digits have dark corners). Served by a real server
to show that a backend fault fails only its own batch and the scheduler keeps running, and that a stalled
forward costs only its own requests their deadline."""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from nccr_guard.nets import MnistCNN


class FaultyMnist(MnistCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0, 0, 0] > 0.5).any()):
            raise RuntimeError("injected fault: poisoned input in this batch")
        if bool((x[:, 0, 0, -1] > 0.5).any()):
            time.sleep(3)
        return super().forward(x)


def faulty_folder(dest: Path, mnist: Path) -> Path:
    """A model folder `dest`/faulty serving FaultyMnist with the MNIST model's weights and calibration (torch
    only: the ONNX file would bypass the faults). Needs the repository root on PYTHONPATH where it is served."""
    folder = dest / "faulty"
    folder.mkdir()
    for f in ("weights.pt", "calibration.npz"):
        shutil.copy(mnist / f, folder / f)
    toml = (mnist / "model.toml").read_text()
    toml = toml.replace('name = "mnist"', 'name = "faulty"').replace('onnx = "model.onnx"\n', "")
    (folder / "model.toml").write_text(toml.replace("nccr_guard.nets:MnistCNN", "tests.faulty:FaultyMnist"))
    return folder


def marked(png: bytes, corner: tuple[int, int]) -> bytes:
    """The digit with one bright corner pixel: FaultyMnist's trigger ((0, 0) fails, (0, -1) stalls)."""
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png))).copy()
    img[corner] = 255
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()
