"""Per-input NCCR from the activations of an input's rows. Vectorised over a batch of inputs.

acts: layer -> (B, R, N) activations, row 0 of each input its original. Layer key "*" is every watched
layer and the logits side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from nccr_guard.engine.combiner import linear, spread, zscores
from nccr_guard.engine.variants import MARGIN_MEASURES, Component, Variant

if TYPE_CHECKING:
    from nccr_guard.engine.calibration import Calibration

EPS = 1e-6


@dataclass
class Scores:
    """score: (B,) combined standardised NCCR; raw: (B, n_components); prediction/confidence: (B,)."""

    score: np.ndarray
    raw: np.ndarray
    prediction: np.ndarray
    confidence: np.ndarray


def view(acts: dict[str, np.ndarray], key: str) -> np.ndarray:
    """(B, R, N) activations for a layer key; '*' concatenates every layer (logits last), 'last' is the deepest
    watched layer before the logits (so a variant can name it without knowing the model), 'probs' the softmax."""
    if key in acts:  # a layer, or a view raw_components has already built for this batch
        return acts[key]
    if key == "probs":
        return softmax(acts["logits"].astype(np.float64)).astype(np.float32)
    if key == "last":
        key = [k for k in acts if k != "logits"][-1]
    if key != "*":
        return acts[key]
    names = [k for k in acts if k != "logits"] + ["logits"]
    return np.concatenate([acts[k] for k in names], axis=-1)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _pick(v: np.ndarray, sel: np.ndarray | None) -> np.ndarray:
    """Keep each input's selected neurons. v: (B, R, N) or per-neuron (N,); sel: (B, m) or None for all."""
    if sel is None:
        return v
    if v.ndim == 1:
        return v[sel][:, None, :]
    return np.take_along_axis(v, sel[:, None, :], axis=-1)


def class_margin(logits: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """(B, R) logit margin of class `cls` (B,) over the best other class, per row."""
    b = np.arange(len(cls))[:, None]
    r = np.arange(logits.shape[1])[None, :]
    c = cls[:, None]
    top = logits[b, r, c]
    others = logits.copy()
    others[b, r, c] = -np.inf
    return top - others.max(axis=-1)


def relative_margin(margin: np.ndarray, rows: slice) -> np.ndarray:
    """(B, copies) each copy's logit margin as a share of its original's (1: unchanged, < 0: flipped). The
    calibration's near-flip cut-off and the sequential test's count of near flips read it alike."""
    return margin[:, rows] / np.maximum(np.abs(margin[:, :1]), EPS)


# A copy's prediction flips only when another class beats the original's by more than this share of the logit
# scale: a near-tie must not turn on float noise (batched forwards may differ in the last bits with the batch's
# composition, and a single flip in K copies decides the verdict of the `nccr-audio` variants).
FLIP_TOLERANCE = 1e-4


def margin_moves(m: np.ndarray, rows: slice | list[int], measure: str) -> np.ndarray:
    """(B, rows) how far each row's logit margin moved from the original's, relative to it: the drop (`margin`)
    or the change either way (`margin_change`). One place for the arithmetic that per-component scoring and
    nccr-v3's one-gather path (raw_components) must share bit for bit."""
    delta = m[:, :1] - m[:, rows]
    delta = np.maximum(delta, 0.0) if measure == "margin" else np.abs(delta)
    return delta / np.maximum(np.abs(m[:, :1]), EPS)


def component_copies(
    comp: Component,
    acts: dict[str, np.ndarray],
    calib: Calibration,
    rows: slice,
    pred: np.ndarray,
    margin: np.ndarray | None = None,
) -> np.ndarray:
    """(B, copies) how much the watched neurons move in each perturbed copy of the component's family.
    `margin`: the (B, R) logit margins of `pred`, when the caller has them (several components share them)."""
    if comp.measure in MARGIN_MEASURES:
        logits = acts["logits"]
        m = class_margin(logits, pred) if margin is None else margin
        if comp.measure == "pred_flip":
            scale = 1.0 + np.abs(logits[:, rows]).max(-1)
            return (m[:, rows] < -FLIP_TOLERANCE * scale).astype(np.float32)
        return margin_moves(m, rows, comp.measure)
    sel = calib.selection[comp.layer][pred] if comp.selection == "class" else None
    a = _pick(view(acts, comp.layer), sel)
    a0, ak = a[:, :1], a[:, rows]
    if comp.measure == "flip":
        t = _pick(calib.thresholds[comp.layer], sel)
        return ((ak > t) != (a0 > t)).mean(axis=-1)
    s = _pick(calib.spread[f"{comp.perturbation}|{comp.layer}"], sel)
    return (np.abs(ak - a0) / s).mean(axis=-1)


def reduce_copies(comp: Component, per_copy: np.ndarray) -> np.ndarray:
    if per_copy.shape[1] == 1:  # a squeezer's single row: its own value (np.mean's overhead was ~14 us a call)
        return per_copy[:, 0]
    return per_copy.max(axis=1) if comp.reduce == "max" else per_copy.mean(axis=1)


def component_raw(
    comp: Component, acts: dict[str, np.ndarray], calib: Calibration, rows: slice, pred: np.ndarray
) -> np.ndarray:
    """(B,) raw value of one component: how much the watched neurons move under its perturbation."""
    return reduce_copies(comp, component_copies(comp, acts, calib, rows, pred))


def raw_components(variant: Variant, calib: Calibration, acts: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(B, n_components) raw values and (B,) predictions of the original rows."""
    pred = acts["logits"][:, 0].argmax(-1)
    m = shared_margin(variant, acts, pred)
    if (one := variant.one_row_margins) is not None and m is not None:  # every component's row at once
        measure, cols = one
        # C order, as np.stack gave: calibration's mean over inputs sums in memory order (last bits differ)
        return margin_moves(m, cols, measure).astype(np.float64, order="C"), pred
    groups = variant.groups
    # each derived view ('*', 'probs', 'last') once per batch, not once per component that reads it
    acts = acts | {k: view(acts, k) for k in {c.layer for c in variant.components} if k not in acts}
    raw = np.stack(
        [
            reduce_copies(c, component_copies(c, acts, calib, groups[c.perturbation], pred, m))
            for c in variant.components
        ],
        -1,
    )
    return raw.astype(np.float64), pred


def shared_margin(variant: Variant, acts: dict[str, np.ndarray], pred: np.ndarray) -> np.ndarray | None:
    """The logit margins every margin component reads, computed once."""
    return class_margin(acts["logits"], pred) if any(c.measure in MARGIN_MEASURES for c in variant.components) else None


def standardise(raw: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Component-wise z-score of log(raw) against clean data, then the max: (B, n) -> (B,)."""
    return ((np.log(raw + EPS) - mu) / sigma).max(axis=-1)


def combine(raw: np.ndarray, calib: Calibration) -> np.ndarray:
    """(B, n) raw components -> (B,) score, by the calibration's combiner (engine/combiner.py): the max of the
    z-scores, or the fitted weighted sum of the clipped z-scores."""
    if calib.weights is None:
        return standardise(raw, calib.comp_mu, calib.comp_sigma)
    return linear(zscores(raw, calib.comp_mu, calib.comp_sigma), calib.weights, calib.bias)


def ood_spread(raw: np.ndarray, calib: Calibration) -> np.ndarray:
    """(B,) how far each input's whole instability profile lies from clean data's (combiner.spread); above
    `calib.ood_threshold` the input is unlike the clean data the detector was calibrated on."""
    return spread(zscores(raw, calib.comp_mu, calib.comp_sigma))


def confidence(acts: dict[str, np.ndarray], pred: np.ndarray) -> np.ndarray:
    """(B,) softmax probability of each original row's predicted class."""
    probs = softmax(acts["logits"][:, 0].astype(np.float64))
    return probs[np.arange(len(pred)), pred]


def score_rows(variant: Variant, calib: Calibration, acts: dict[str, np.ndarray]) -> Scores:
    """The full per-input verdict material for a batch of inputs' rows."""
    raw, pred = raw_components(variant, calib, acts)
    return Scores(
        score=combine(raw, calib),
        raw=raw,
        prediction=pred,
        confidence=confidence(acts, pred),
    )
