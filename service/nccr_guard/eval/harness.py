"""`nccr-guard evaluate`: attack held-out inputs with ART, score clean and successful adversarial inputs with
NCCR and the baselines, and write eval.json / eval.md / roc.png / scores.png.

Thresholds for TPR@5%FPR come from the calib split's clean inputs, never from the evaluated split.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from nccr_guard.calibrate import activations, calibrate
from nccr_guard.datasets import load_calibration, with_data
from nccr_guard.detector import Detector
from nccr_guard.engine import get_variant, score_rows
from nccr_guard.engine.sequential import replay
from nccr_guard.eval.attacks import attack_table, correctly_classified, spread
from nccr_guard.eval.baselines import baseline_scores
from nccr_guard.eval.metrics import auroc, rate_above, threshold_at_fpr
from nccr_guard.eval.report import write_report


def nccr_scores(det: Detector, xs: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Fixed-K NCCR scores and, where the variant tests sequentially, the sequential test's scores replayed
    over the same rows ("nccr_seq"), with the rows each sequential verdict used."""
    if not len(xs):
        return {"nccr": np.zeros(0), **({"nccr_seq": np.zeros(0)} if det.variant.sequential else {})}, None
    acts = activations(det, xs, desc="nccr")
    out = {"nccr": score_rows(det.variant, det.calib, acts).score}
    if not det.variant.sequential:
        return out, None
    seq, passes = replay(det.variant, det.calib, acts, det.variant.sequential)
    return {**out, "nccr_seq": seq.score}, passes


def false_alarms(det: Detector, x0: np.ndarray, thresholds: dict, seed: int) -> tuple[dict, dict]:
    """Per benign shift of the clean inputs (eval.shifts: whether the combiner's fit saw it or not) and per
    out-of-distribution input kind: the share each detector flags at its threshold, and the share NCCR marks
    `ood`. A shift is no attack: every flag there is a false alarm."""
    from nccr_guard.engine.score import ood_spread
    from nccr_guard.eval import shifts

    def rates(xs: np.ndarray) -> dict[str, float]:
        s = score_rows(det.variant, det.calib, activations(det, xs, desc="shift"))
        out = {"nccr": rate_above(s.score, thresholds["nccr"])}
        out |= {k: rate_above(v, thresholds[k]) for k, v in baseline_scores(det, xs).items()}
        return out | {"nccr_ood": float(np.mean(ood_spread(s.raw, det.calib) > det.calib.ood_threshold))}

    ss = shifts.for_manifest(det.manifest)
    fits = det.variant.combiner == "logistic"  # only a logistic combiner is fitted, on the calibration shifts
    benign = {
        name: {**rates(xs), "fitted": fits and name in ss.calibration}
        for name, xs in ss.shifted(x0, seed + 1000).items()
    }
    benign["none"] = {**rates(x0), "fitted": fits}
    ood = {k: rates(v) for k, v in ss.ood(min(50, len(x0)), x0.shape[1:], seed).items()}
    return benign, ood


def successful(det: Detector, clf, split: str, n: int, seed: int, name: str, x0: np.ndarray):
    """An attack's successful adversarial examples of the split's first-n correctly classified inputs (cached
    beside the search's, eval.sequential.adversarial) and the position in `x0` of each one's clean input."""
    from nccr_guard.eval.lofo import source_index
    from nccr_guard.eval.sequential import adversarial

    x_cached, out = adversarial(det, split, n, seed, [name])
    if len(x_cached) != len(x0) or not np.array_equal(x_cached, x0):
        raise RuntimeError(f"{name}: cached clean inputs differ from this run's; clear the adversarial cache")
    xa = out[name]
    return xa, source_index(x0, xa)


def wrong_margin(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n,) how far the best wrong class's logit beats the true class's: 0 at the boundary, the attack's
    confidence beyond it."""
    other = np.where(np.eye(logits.shape[1], dtype=bool)[y], -np.inf, logits).max(1)
    return other - logits[np.arange(len(y)), y]


def median_snr_db(x: np.ndarray, delta: np.ndarray) -> float:
    """Signal-to-perturbation ratio, the audio literature's size of an attack."""
    power = np.square(x.reshape(len(x), -1), dtype=np.float64).sum(1)
    return float(np.median(10 * np.log10(power / np.maximum(np.square(delta, dtype=np.float64).sum(1), 1e-20))))


def load_detector(model: Path, variant: str | None, seed: int) -> Detector:
    """The calibrated detector; a different `variant` is calibrated in memory on the same calib split."""
    det = Detector.load(model, device="cpu", seed=seed, sequential=False)
    if variant and variant != det.variant.name:
        det.variant = get_variant(variant)
        det.calib = calibrate(model, variant=variant, seed=seed, write=False)
    return det


def detector_metrics(clean: dict, adv: dict, thresholds: dict) -> dict:
    return {
        name: {
            "auroc": auroc(clean[name], adv[name]),
            "tpr_at_fpr05": rate_above(adv[name], thresholds[name]),
            "fpr": rate_above(clean[name], thresholds[name]),
        }
        for name in clean
    }


def evaluate(
    model: Path,
    attacks: list[str] | None = None,
    n: int = 500,
    seed: int = 0,
    out: Path = Path("reports/mnist"),
    split: str = "test",
    variant: str | None = None,
    command: str = "",
    calib_n: int | None = None,
    data: Path | None = None,
) -> dict:
    """`data`: labelled inputs (datasets.labelled_data) instead of the manifest's splits: half of them attacked
    and scored, the other half the baselines' calibration (`split` is then ignored)."""
    t0 = time.perf_counter()
    np.random.seed(seed)
    import torch

    torch.manual_seed(seed)
    det = load_detector(model, variant, seed)
    if data is not None:
        det.manifest, split = with_data(det.manifest, data)
    table = attack_table(det.manifest)
    attacks = attacks or list(table)
    unknown = [a for a in attacks if a not in table]
    if unknown:
        raise ValueError(f"unknown attacks {unknown}; known: {', '.join(table)}")
    x_cal, _ = spread(*load_calibration(det.manifest, calib_n), calib_n or 1 << 30)
    thresholds = {k: threshold_at_fpr(v) for k, v in baseline_scores(det, x_cal).items()}
    thresholds["nccr"] = thresholds["nccr_seq"] = det.calib.threshold
    clf, x0, y0, accuracy = correctly_classified(det, split, n)
    nccr, passes = nccr_scores(det, x0)
    clean = {**nccr, **baseline_scores(det, x0)}
    result = {
        "model": det.manifest.name,
        "modality": det.manifest.modality,
        "variant": det.variant.name,
        "command": command,
        "seed": seed,
        "split": split,
        "data": str(data) if data is not None else None,
        "n_clean": len(x0),
        "clean_accuracy": accuracy,
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "thresholds": {k: v for k, v in thresholds.items() if k in clean},
        "attacks": {},
    }
    if passes is not None:
        result["sequential"] = {
            "schedule": det.variant.sequential.__dict__,
            "fixed_rows": det.variant.rows,
            "mean_rows": {"clean": float(passes.mean())},
        }
    raw_scores = {"clean": {k: v.tolist() for k, v in clean.items()}}
    for name in attacks:
        ta = time.perf_counter()
        xa, src = successful(det, clf, split, n, seed, name, x0)
        logits = clf.predict(xa)
        nccr, passes = nccr_scores(det, xa)
        scores = {**nccr, **baseline_scores(det, xa)} if len(xa) else {k: np.zeros(0) for k in clean}
        if passes is not None:
            result["sequential"]["mean_rows"][name] = float(passes.mean())
        delta = (xa - x0[src]).reshape(len(xa), -1)
        result["attacks"][name] = {
            "params": table[name].params,
            "family": table[name].family,
            "strength": table[name].strength,
            "success_rate": len(xa) / max(len(x0), 1),
            "mean_wrong_margin": float(wrong_margin(logits, y0[src]).mean()) if len(xa) else None,
            "mean_l0": float((np.abs(delta) > 1e-3).sum(1).mean()) if len(xa) else None,
            "n_adversarial": len(xa),
            "mean_l2": float(np.linalg.norm(delta, axis=1).mean()) if len(xa) else None,
            "mean_linf": float(np.abs(delta).max(1).mean()) if len(xa) else None,
            "median_snr_db": median_snr_db(x0[src], delta) if len(xa) else None,
            "seconds": round(time.perf_counter() - ta, 1),
            "detectors": detector_metrics(clean, scores, thresholds),
        }
        raw_scores[name] = {k: v.tolist() for k, v in scores.items()}
        print(
            json.dumps(
                {
                    "attack": name,
                    "n_adversarial": len(xa),
                    **{d: round(m["auroc"], 4) for d, m in result["attacks"][name]["detectors"].items()},
                }
            ),
            flush=True,
        )
    result["benign_shifts"], result["ood_inputs"] = false_alarms(det, x0, thresholds, seed)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_report(result, raw_scores, out)
    return result
