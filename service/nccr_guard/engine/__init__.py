"""The NCCR engine: pure functions over numpy arrays. No torch, no onnxruntime, no HTTP, no globals.

Shapes: an input `x` is one sample in model-input space, e.g. (C, H, W) for images or (T,) for audio.
Rows are the original plus its perturbed copies, stacked: (R, *x.shape), row 0 the original; a batch of
inputs gives (B, R, *x.shape).
Activations are dicts `layer -> (R, N)`; "logits" is always one of them.
"""

from nccr_guard.engine.calibration import Calibration, fit_calibration
from nccr_guard.engine.perturb import Perturbation, build_batch, build_rows
from nccr_guard.engine.score import Scores, score_rows
from nccr_guard.engine.variants import VARIANTS, Component, Variant, get_variant

__all__ = [
    "VARIANTS",
    "Calibration",
    "Component",
    "Perturbation",
    "Scores",
    "Variant",
    "build_batch",
    "build_rows",
    "fit_calibration",
    "get_variant",
    "score_rows",
]
