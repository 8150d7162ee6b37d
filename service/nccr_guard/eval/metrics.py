"""Detection metrics: AUROC and TPR at a threshold fixed on clean calibration data (never on the test set)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def auroc(clean: np.ndarray, adv: np.ndarray) -> float:
    """Probability that an adversarial input outscores a clean one (ties count half): Mann-Whitney U / (n m)."""
    clean, adv = np.asarray(clean, float), np.asarray(adv, float)
    if not len(clean) or not len(adv):
        return float("nan")
    ranks = rankdata(np.concatenate([adv, clean]))
    u = ranks[: len(adv)].sum() - len(adv) * (len(adv) + 1) / 2
    return float(u / (len(adv) * len(clean)))


def threshold_at_fpr(calib_clean: np.ndarray, fpr: float = 0.05) -> float:
    return float(np.quantile(np.asarray(calib_clean, float), 1.0 - fpr, method="higher"))


def rate_above(scores: np.ndarray, threshold: float) -> float:
    scores = np.asarray(scores, float)
    return float((scores > threshold).mean()) if len(scores) else float("nan")
