"""How standardised components become one score, and how far an input lies from clean data.

Two combiners. `max`: the largest z-score, so one unstable view of the input is enough (nccr-v1..v3).
`logistic`: a weighted sum of the clipped z-scores, w . z + b, the log-odds of a logistic regression fitted
on clean and benignly distorted inputs against adversarial ones. Why: under the leave-one-family-out protocol
(eval/lofo.py, docs/nccr.md) a max of a few components picked on some attack families breaks on the family it
did not see, while a regression over every component spreads its weight over many views and holds.

Shapes: raw (B, n_components); z (B, n_components); weights (n_components,).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-6
Z_CLIP = 30.0  # beyond this a z-score says "far outside clean" and no more: a weighted sum stays bounded


def zscores(raw: np.ndarray, mu: np.ndarray, sigma: np.ndarray, clip: bool = True) -> np.ndarray:
    """(B, n) z-score of log(raw) against clean data, clipped to +-Z_CLIP unless `clip` is False."""
    z = (np.log(raw + EPS) - mu) / sigma
    return np.clip(z, -Z_CLIP, Z_CLIP) if clip else z


def linear(z: np.ndarray, weights: np.ndarray, bias: float) -> np.ndarray:
    """(B,) the logistic combiner's score: w . z + b (log-odds of adversarial)."""
    return z @ weights + bias


def spread(z: np.ndarray) -> np.ndarray:
    """(B,) root-mean-square z-score: how far, over all components together, an input's instability profile
    lies from clean data's, in either direction. Blank, constant and noise images and other non-inputs sit far
    out (their views are all far too stable or far too unstable); the verdict's `ood` flag reads it."""
    return np.sqrt(np.mean(np.square(z), axis=-1))


def fit_logistic(
    negatives: np.ndarray, positives: list[np.ndarray], c: float = 0.1, iters: int = 500, nonneg: bool = False
) -> tuple[np.ndarray, float]:
    """(weights, bias) of an L2-regularised logistic regression of z-scores, fitted by L-BFGS.

    Each positive group (one attack's adversarial examples) carries the same total weight, and all positives
    together as much as the negatives: no attack or family outweighs another by its number of examples.
    `c`: inverse regularisation strength of a loss summed over unit total weight (penalty ||w||^2 / 2c).
    `nonneg`: every weight >= 0, so that more instability never lowers the score (a monotone combiner; the
    leave-one-family-out search, eval/lofo.py, measures whether that generalises)."""
    from scipy.optimize import minimize

    groups = [g for g in positives if len(g)]
    if not len(negatives) or not groups:
        raise ValueError("fitting the logistic combiner needs clean and adversarial examples")
    x = np.concatenate([negatives, *groups]).astype(np.float64)
    y = np.concatenate([np.zeros(len(negatives)), np.ones(sum(len(g) for g in groups))])
    w_row = np.concatenate(
        [np.full(len(negatives), 0.5 / len(negatives))] + [np.full(len(g), 0.5 / len(groups) / len(g)) for g in groups]
    )
    n = x.shape[1]

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:n], theta[n]
        t = x @ w + b
        p = 1.0 / (1.0 + np.exp(-t))
        nll = np.sum(w_row * (np.logaddexp(0.0, t) - y * t))
        g = w_row * (p - y)
        reg = 0.5 / c * float(w @ w)
        return nll + reg, np.concatenate([x.T @ g + w / c, [g.sum()]])

    bounds = [(0.0, None)] * n + [(None, None)] if nonneg else None
    res = minimize(loss, np.zeros(n + 1), jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": iters})
    return res.x[:n].astype(np.float64), float(res.x[n])
