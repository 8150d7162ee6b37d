"""Fit a logistic combiner's weights (engine/combiner.py) for a calibrated detector.

Negatives: clean inputs of the fit split and their benign shifts (the calibration shifts of eval.shifts'
set for the model's modality: a rotated, blurred, re-encoded or grey-backed upload, a shorter, band-limited or
noisy clip is still clean). Positives: successful adversarial examples of the
same inputs, one group per attack of every family (eval.attacks), each group weighted alike. The calib split's
half B then sets the threshold with the fitted weights (engine.calibration.set_combiner), so the false-positive
rate stays fixed on data the weights never saw. Needs ART and the model's torch module (the attacks' gradients).
"""

from __future__ import annotations

import numpy as np

from nccr_guard.calibrate import activations
from nccr_guard.detector import Detector
from nccr_guard.engine import Calibration
from nccr_guard.engine.combiner import fit_logistic, zscores
from nccr_guard.engine.score import raw_components
from nccr_guard.eval import shifts
from nccr_guard.eval.attacks import attack_table
from nccr_guard.eval.sequential import adversarial

FIT_SPLIT, FIT_N = "dev", 200


def z_of(det: Detector, calib: Calibration, xs: np.ndarray, desc: str) -> np.ndarray:
    """(n, n_components) clipped z-scores of inputs `xs` under the detector's variant and `calib`."""
    raw, _ = raw_components(det.variant, calib, activations(det, xs, desc=desc))
    return zscores(raw, calib.comp_mu, calib.comp_sigma)


def fit_groups(
    det: Detector, calib: Calibration, split: str, n: int, seed: int, attacks: list[str] | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Negative z-scores (clean and benignly shifted) and positive ones per attack, from the split's first n
    correctly classified inputs."""
    attacks = attacks or list(attack_table(det.manifest))
    x0, advs = adversarial(det, split, n, seed, attacks)
    ss = shifts.for_manifest(det.manifest)
    neg = [z_of(det, calib, x0, f"{split} clean")]
    for s, xs in ss.shifted(x0, seed + 100, ss.calibration).items():
        neg.append(z_of(det, calib, xs, s))
    return np.concatenate(neg), {a: z_of(det, calib, xa, a) for a, xa in advs.items() if len(xa)}


def fit_weights(
    det: Detector, calib: Calibration, split: str = FIT_SPLIT, n: int = FIT_N, seed: int = 0
) -> tuple[np.ndarray, float, dict]:
    """(weights, bias, what they were fitted on) for the detector's logistic variant."""
    neg, pos = fit_groups(det, calib, split, n, seed)
    w, b = fit_logistic(neg, list(pos.values()), det.variant.combiner_c)
    fitted_on = {
        "split": split,
        "n": n,
        "negatives": len(neg),
        "shifts": list(shifts.for_manifest(det.manifest).calibration),
        "attacks": {a: len(v) for a, v in pos.items()},
        "c": det.variant.combiner_c,
    }
    return w, b, fitted_on
