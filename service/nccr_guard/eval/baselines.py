"""Baseline detectors scored on the same inputs as NCCR, through the same backend.

Images. feature_squeezing: Xu et al. (NDSS 2018) for MNIST: max L1 distance between the softmax of the input and
of its 1-bit-depth and 2x2-median squeezed copies. prediction_flip: share of Gaussian-noised copies whose label
differs (an input-level cousin of LCR). low_margin: minus the top-1 logit margin (a trivial confidence signal).

Audio. prediction_flip: the same with noise at 30 dB SNR. waveguard_resample: WaveGuard-style (Hussain et al.,
USENIX Security 2021) input transformation check: L1 distance between the softmax of the clip and of the clip
down-sampled 2x and back (an 8 kHz band limit), with scipy's polyphase filter. low_margin as for images.
"""

from __future__ import annotations

import numpy as np

from nccr_guard.detector import Detector
from nccr_guard.engine.perturb import Perturbation, build_batch
from nccr_guard.engine.score import softmax

FS_SQUEEZERS = (Perturbation("bitdepth", 1), Perturbation("median", 2))


def _logits(det: Detector, rows: np.ndarray, chunk: int = 2048) -> np.ndarray:
    return np.concatenate([det.forward(rows[i : i + chunk])["logits"] for i in range(0, len(rows), chunk)])


def feature_squeezing(det: Detector, xs: np.ndarray) -> np.ndarray:
    vr = tuple(det.manifest.input.range)
    rows = build_batch(xs, FS_SQUEEZERS, None, vr)
    probs = softmax(_logits(det, rows.reshape(-1, *xs.shape[1:])).reshape(len(xs), 3, -1).astype(np.float64))
    return np.abs(probs[:, 1:] - probs[:, :1]).sum(-1).max(-1)


def prediction_flip(det: Detector, xs: np.ndarray, sigma: float = 0.1, k: int = 12, seed: int = 0) -> np.ndarray:
    rng, vr = np.random.default_rng(seed), tuple(det.manifest.input.range)
    p = Perturbation("snr", 30, k) if det.manifest.modality == "audio" else Perturbation("gaussian", sigma, k)
    rows = build_batch(xs, (p,), [rng] * len(xs), vr)
    pred = _logits(det, rows.reshape(-1, *xs.shape[1:])).reshape(len(xs), k + 1, -1).argmax(-1)
    return (pred[:, 1:] != pred[:, :1]).mean(-1)


def waveguard_resample(det: Detector, xs: np.ndarray, factor: int = 2) -> np.ndarray:
    from scipy.signal import resample_poly

    squeezed = resample_poly(resample_poly(xs, 1, factor, axis=-1), factor, 1, axis=-1)[..., : xs.shape[-1]]
    rows = np.stack([xs, squeezed.astype(np.float32)], 1).reshape(-1, *xs.shape[1:])
    probs = softmax(_logits(det, rows).reshape(len(xs), 2, -1).astype(np.float64))
    return np.abs(probs[:, 1] - probs[:, 0]).sum(-1)


def low_margin(det: Detector, xs: np.ndarray) -> np.ndarray:
    logits = np.sort(_logits(det, xs), axis=-1)
    return -(logits[:, -1] - logits[:, -2])


BASELINES = {
    "image": {"prediction_flip": prediction_flip, "feature_squeezing": feature_squeezing, "low_margin": low_margin},
    "audio": {"prediction_flip": prediction_flip, "waveguard_resample": waveguard_resample, "low_margin": low_margin},
}


def baseline_scores(det: Detector, xs: np.ndarray) -> dict[str, np.ndarray]:
    return {name: fn(det, xs) for name, fn in BASELINES[det.manifest.modality].items()}
