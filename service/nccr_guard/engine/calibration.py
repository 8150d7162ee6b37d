"""Clean-data statistics that turn activations into an NCCR score, and the verdict threshold.

Fitted on two disjoint halves of clean calibration data: half A gives the per-neuron statistics (cover
thresholds, per-class neuron selection, per-neuron change spread), half B the score distribution (component
standardisation, verdict threshold, p-value table). Keeping them apart keeps the false-positive rate honest.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from nccr_guard.engine.perturb import row_groups
from nccr_guard.engine.score import (
    EPS,
    combine,
    component_raw,
    ood_spread,
    raw_components,
    relative_margin,
    shared_margin,
    view,
)
from nccr_guard.engine.variants import Variant

FORMAT_VERSION = 1


@dataclass
class Calibration:
    variant: str
    thresholds: dict[str, np.ndarray]  # layer key -> (N,) cover threshold
    selection: dict[str, np.ndarray]  # layer key -> (C, m) neuron indices per predicted class
    spread: dict[str, np.ndarray]  # "perturbation|layer" -> (N,) clean RMS change
    comp_mu: np.ndarray  # (n_components,) mean of log raw on clean half B
    comp_sigma: np.ndarray
    threshold: float  # verdict threshold on the combined score
    target_fpr: float
    clean_scores: np.ndarray  # sorted combined scores of clean half B, for p-values
    robustness: float  # model-level NCCR: mean robustness component over clean data
    meta: dict = field(default_factory=dict)
    # The logistic combiner's fitted weights over the clipped z-scores and its bias; None: the max combiner.
    weights: np.ndarray | None = None
    bias: float = 0.0
    # The verdict's `ood` flag: an input whose z-score spread (combiner.spread) exceeds this is unlike clean data.
    ood_threshold: float = float("inf")

    def p_value(self, score: np.ndarray | float) -> np.ndarray:
        """Share of clean calibration inputs scoring at least as high (with the +1 of a conformal p-value)."""
        n = len(self.clean_scores)
        above = n - np.searchsorted(self.clean_scores, np.asarray(score), side="left")
        return (above + 1) / (n + 1)

    def p_values(self, scores: list[float]) -> list[float]:
        """p_value of each score of a list, in plain Python. Why: a verdict's scores are Python floats by then,
        and numpy's four array operations cost ~25 us per call amid the forward and the verdicts at one MNIST
        input (their code evicts each other's from the caches; bisect was not measurable there). A NaN score gets
        the smallest p-value, as np.searchsorted sorts NaN last."""
        clean, n = self._clean_list, len(self._clean_list)
        return [(n - (bisect.bisect_left(clean, s) if s == s else n) + 1) / (n + 1) for s in scores]

    @cached_property
    def _clean_list(self) -> list[float]:
        """clean_scores as a list, made on first use: a calibration's arrays are not changed once fitted or
        loaded (a new calibration replaces the object)."""
        return self.clean_scores.tolist()

    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {}
        index: dict[str, dict[str, str]] = {"thresholds": {}, "selection": {}, "spread": {}}
        for kind in index:
            for i, (k, v) in enumerate(getattr(self, kind).items()):
                arrays[f"{kind}_{i}"] = v
                index[kind][k] = f"{kind}_{i}"
        meta = {
            "format": FORMAT_VERSION,
            "variant": self.variant,
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "robustness": self.robustness,
            "bias": self.bias,
            "ood_threshold": self.ood_threshold,
            "index": index,
            **self.meta,
        }
        np.savez_compressed(
            path,
            comp_mu=self.comp_mu,
            comp_sigma=self.comp_sigma,
            clean_scores=self.clean_scores,
            meta=np.array(json.dumps(meta, sort_keys=True)),
            **({"weights": self.weights} if self.weights is not None else {}),
            **arrays,
        )

    @classmethod
    def load(cls, path: Path) -> Calibration:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FORMAT_VERSION:
                raise ValueError(f"{path}: calibration format {meta.get('format')} != {FORMAT_VERSION}; recalibrate")
            index = meta.pop("index")
            tables = {kind: {k: z[name] for k, name in index[kind].items()} for kind in index}
            return cls(
                variant=meta.pop("variant"),
                threshold=float(meta.pop("threshold")),
                target_fpr=float(meta.pop("target_fpr")),
                robustness=float(meta.pop("robustness")),
                weights=z["weights"] if "weights" in z.files else None,
                bias=float(meta.pop("bias", 0.0)),
                ood_threshold=float(meta.pop("ood_threshold", float("inf"))),
                comp_mu=z["comp_mu"],
                comp_sigma=z["comp_sigma"],
                clean_scores=z["clean_scores"],
                meta={k: v for k, v in meta.items() if k != "format"},
                **tables,
            )


def _layer_keys(variant: Variant) -> list[str]:
    return sorted({c.layer for c in (*variant.components, variant.robustness)})


def class_selection(a0: np.ndarray, pred: np.ndarray, n_classes: int, m: int) -> np.ndarray:
    """(C, m) neurons most characteristic of each predicted class: largest standardised mean shift.

    Uses activations only (no weights or gradients), so it works for any tapped model, ONNX included.
    """
    mean, std = a0.mean(0), a0.std(0) + EPS
    m = min(m, a0.shape[1])
    out = np.empty((n_classes, m), dtype=np.int64)
    fallback = np.argsort(-std)[:m]
    for c in range(n_classes):
        rows = a0[pred == c]
        out[c] = np.argsort(-(rows.mean(0) - mean) / std)[:m] if len(rows) else fallback
    return out


def fit_neuron_stats(variant: Variant, acts: dict[str, np.ndarray], n_classes: int) -> Calibration:
    """Per-neuron statistics from clean half A. acts: layer -> (n, R, N)."""
    pred = acts["logits"][:, 0].argmax(-1)
    thresholds, selection, spread = {}, {}, {}
    groups = row_groups(variant.perturbations)
    for key in _layer_keys(variant):
        a = view(acts, key)
        thresholds[key] = np.quantile(a[:, 0], variant.threshold_quantile, axis=0).astype(np.float32)
        selection[key] = class_selection(a[:, 0], pred, n_classes, variant.top_m)
        for pkey, rows in groups.items():
            rms = np.sqrt(np.mean(np.square(a[:, rows] - a[:, :1]), axis=(0, 1)))
            spread[f"{pkey}|{key}"] = np.maximum(rms, 1e-2 * np.median(rms) + EPS).astype(np.float32)
    n = len(variant.components)
    return Calibration(
        variant=variant.name,
        thresholds=thresholds,
        selection=selection,
        spread=spread,
        comp_mu=np.zeros(n),
        comp_sigma=np.ones(n),
        threshold=np.inf,
        target_fpr=0.0,
        clean_scores=np.zeros(0),
        robustness=float("nan"),
    )


def model_nccr(variant: Variant, calib: Calibration, acts: dict[str, np.ndarray]) -> np.ndarray:
    """(n,) absolute NCCR of the robustness component per clean input: its mean is the model-level NCCR. `acts`:
    rows of `variant.robustness_variant()`."""
    variant = variant.robustness_variant()
    comp = variant.robustness
    pred = acts["logits"][:, 0].argmax(-1)
    return component_raw(comp, acts, calib, row_groups(variant.perturbations)[comp.perturbation], pred)


def fit_calibration(
    variant: Variant,
    acts_a: dict[str, np.ndarray],
    acts_b: dict[str, np.ndarray],
    n_classes: int,
    target_fpr: float = 0.05,
    meta: dict | None = None,
) -> Calibration:
    """Fit everything from two disjoint halves of clean calibration rows (layer -> (n, R, N) each)."""
    if not 0.0 < target_fpr < 1.0:
        raise ValueError("target_fpr must be in (0, 1)")
    calib = fit_neuron_stats(variant, acts_a, n_classes)
    raw, _ = raw_components(variant, calib, acts_b)
    logs = np.log(raw + EPS)
    calib.comp_mu = logs.mean(0)
    calib.comp_sigma = logs.std(0) + 1e-3
    calib.target_fpr = target_fpr
    set_scores(calib, raw)
    calib.robustness = (  # with rows of its own, the caller forwards them (calibrate.model_level)
        float(np.concatenate([model_nccr(variant, calib, a) for a in (acts_a, acts_b)]).mean())
        if variant.robustness_rows is None
        else float("nan")
    )
    # Per component, the mean raw value on clean half B; for 0/1 measures the Jeffreys-smoothed rate over all
    # copies seen, never 0: the prior of the sequential test's flip bound (engine/sequential.py).
    copies = {p.key: p.copies for p in variant.perturbations}
    n_b = len(raw)
    copy_mean = [
        float((raw[:, i].sum() * copies[c.perturbation] + 0.5) / (n_b * copies[c.perturbation] + 1))
        if c.measure == "pred_flip"
        else float(raw[:, i].mean())
        for i, c in enumerate(variant.components)
    ]
    calib.meta = {**(meta or {}), "copy_mean": copy_mean, "near_flip": near_flips(variant, acts_b)}
    return calib


# Share of clean calibration inputs whose z-score spread is called out of distribution: the `ood` flag's own
# false-alarm rate on clean data (docs/nccr.md, "Out-of-distribution inputs").
OOD_QUANTILE = 0.99


def set_scores(calib: Calibration, raw_b: np.ndarray) -> None:
    """The score distribution of clean half B (`raw_b`: its raw components) under the calibration's combiner:
    sorted clean scores, the verdict threshold at the target FPR, the `ood` threshold."""
    scores = np.sort(combine(raw_b, calib))
    calib.clean_scores = scores
    calib.threshold = float(np.quantile(scores, 1.0 - calib.target_fpr, method="higher"))
    calib.ood_threshold = float(np.quantile(ood_spread(raw_b, calib), OOD_QUANTILE, method="higher"))


def set_combiner(calib: Calibration, raw_b: np.ndarray, weights: np.ndarray, bias: float) -> None:
    """Install a fitted logistic combiner and re-derive the threshold and p-values from clean half B with it."""
    calib.weights, calib.bias = np.asarray(weights, np.float64), float(bias)
    set_scores(calib, raw_b)


# Share of clean copies whose margin counts as a near flip: each clean copy drawn is one with this chance, and
# makes its clip draw more copies. Not tuned (docs/nccr.md, "Sequential testing").
NEAR_FLIP_QUANTILE = 0.01


def near_flips(variant: Variant, acts: dict[str, np.ndarray]) -> list[float | None]:
    """Per component, for prediction flips: the relative margin (copy's margin / original's) below which only
    NEAR_FLIP_QUANTILE of clean copies fall; None for other measures. Why: a flip is binary, so one or two
    copies without a flip say little about a clip that flips in half its copies; a copy that came close (its
    margin fell below what clean copies reach) does, and the sequential test counts it when predicting the flips
    still to come (engine/sequential.py)."""
    pred = acts["logits"][:, 0].argmax(-1)
    margin = shared_margin(variant, acts, pred)
    groups = row_groups(variant.perturbations)
    out: list[float | None] = []
    for c in variant.components:
        if c.measure != "pred_flip" or margin is None:
            out.append(None)
            continue
        out.append(float(np.quantile(relative_margin(margin, groups[c.perturbation]), NEAR_FLIP_QUANTILE)))
    return out
