"""Fit a model folder's NCCR calibration from clean data; the model-level NCCR of a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from nccr_guard.datasets import calibration_splits, load_calibration, load_folder
from nccr_guard.detector import Detector
from nccr_guard.engine import Calibration, fit_calibration, get_variant
from nccr_guard.engine.calibration import model_nccr, set_combiner
from nccr_guard.engine.score import raw_components
from nccr_guard.manifest import Manifest, ManifestError, weight_hashes


def activations(det: Detector, xs: np.ndarray, chunk: int = 32, desc: str = "forward") -> dict[str, np.ndarray]:
    """layer -> (n, R, N) over `xs`, in chunks, with a progress bar on stderr."""
    parts = [det.activations(xs[i : i + chunk]) for i in tqdm(range(0, len(xs), chunk), desc=desc, leave=False)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def clean_inputs(manifest: Manifest, data: Path | None, split: str | None) -> np.ndarray:
    """A folder's inputs, or the named splits' (comma-separated), by default the manifest's calibration splits."""
    if data:
        return load_folder(data, manifest)[0]
    return load_calibration(manifest, names=split.split(",") if split else None)[0]


def calibrate(
    folder: Path,
    data: Path | None = None,
    split: str | None = None,
    variant: str | None = None,
    k: int | None = None,
    target_fpr: float = 0.05,
    seed: int = 0,
    backend: str = "auto",
    write: bool = True,
    device: str = "cpu",
) -> Calibration:
    """Fit and (by default) write `calibration.npz`.

    Even-indexed inputs fit the neuron statistics, odd-indexed ones the score distribution and threshold.
    """
    det = Detector.load(folder, backend=backend, device=device, seed=seed, calibrated=False, truncate=False)
    det.variant = get_variant(variant or det.manifest.variant)
    k = k or det.manifest.k
    if k:
        det.variant = det.variant.with_k(k)
    xs = clean_inputs(det.manifest, data, split)
    if len(xs) < 40:
        raise ValueError(f"need at least 40 clean inputs to calibrate, got {len(xs)}")
    acts = activations(det, xs, desc="calibrate")
    half_a = {key: v[0::2] for key, v in acts.items()}
    half_b = {key: v[1::2] for key, v in acts.items()}
    meta = {
        "weights_sha256": weight_hashes(det.manifest),
        "k": max(p.copies for p in det.variant.perturbations),
        "seed": seed,
        "n_clean": len(xs),
        "data": str(data) if data else f"split:{split or ','.join(calibration_splits(det.manifest))}",
        "model": det.manifest.name,
    }
    calib = fit_calibration(det.variant, half_a, half_b, len(det.manifest.labels), target_fpr, meta)
    if det.variant.combiner == "logistic":
        fit_combiner(det, calib, half_b, seed)
    if det.variant.robustness_rows is not None:
        calib.robustness = float(model_level(det, calib, xs).mean())
    if write:
        calib.save(det.manifest.calibration_path)
    return calib


def fit_combiner(det: Detector, calib: Calibration, half_b: dict[str, np.ndarray], seed: int) -> None:
    """Fit the logistic combiner's weights on the dev split's clean, shifted and attacked inputs
    (eval/combiner_fit.py: runs ART attacks, cached), then fix the threshold on clean half B with them."""
    from nccr_guard.eval.combiner_fit import FIT_N, FIT_SPLIT, fit_weights

    # [split] fit_n: how many correctly classified dev inputs are attacked (a model whose attacks cost more
    # fits on fewer; the leave-one-family-out search that chose the variant should have used as many).
    n = int(det.manifest.split.get("fit_n", FIT_N))
    try:
        w, b, fitted_on = fit_weights(det, calib, n=n, seed=seed)
    except ManifestError as e:
        raise ManifestError(
            f"variant {det.variant.name} fits its combiner on attacks of the {FIT_SPLIT} split ({e}): give the "
            f"model a {FIT_SPLIT} split, or calibrate a max-combined variant (--variant nccr-v3)"
        ) from e
    set_combiner(calib, raw_components(det.variant, calib, half_b)[0], w, b)
    calib.meta["combiner"] = fitted_on


def model_level(det: Detector, calib: Calibration, xs: np.ndarray) -> np.ndarray:
    """(n,) the robustness component per clean input, forwarding the rows it reads: the verdict's own, or its
    own rows (`Variant.robustness_rows`), which the verdict never makes."""
    verdict_variant = det.variant
    det.variant = verdict_variant.robustness_variant()
    try:
        acts = activations(det, xs, desc="robustness")
    finally:
        det.variant = verdict_variant
    return model_nccr(verdict_variant, calib, acts)


def robustness(folder: Path, data: Path | None = None, split: str = "test", backend: str = "auto") -> dict:
    """Model-level NCCR: the robustness component's mean over clean inputs (lower = more stable; how far that
    ranks models by robustness is measured in docs/nccr.md)."""
    det = Detector.load(folder, backend=backend, device="cpu", truncate=False)
    assert det.calib is not None
    xs = clean_inputs(det.manifest, data, split)
    per_input = model_level(det, det.calib, xs)
    comp = det.variant.robustness
    return {
        "model": det.manifest.name,
        "nccr": float(per_input.mean()),
        "std": float(per_input.std()),
        "n": len(xs),
        "measure": comp.name,
        "data": str(data) if data else f"split:{split}",
    }
