"""Sequential testing: forward a variant's noise copies in rounds and stop once the verdict is settled.

Why: a verdict costs its rows, and most inputs are clear-cut long before all K copies are in (LCR's sequential
test, ../shared/anchors.md). Every input's rows are exactly fixed K's (built as rounds reach them, `LazyRows`),
forwarded in rounds: the original, every squeezed row and the first `first` copies of each noise family (per
family where the schedule's `first_by` says so), then `step` more copies of each family per round, up to K.
After each round every component's fixed-K value is bounded:

- squeezers (one deterministic row) and families already at K copies are exact;
- a max over copies can only grow: its lower bound is the running max, its upper bound open;
- a mean over copies is the running mean ± z standard errors of the K-copy mean given the n copies seen
  (finite-population factor (K-n)/(K·n), so the bound closes at n = K); the copies to come add at least 0, so the
  mean so far over K is a certain lower bound;
- a 0/1 measure (prediction flips) is bounded by its Beta-Binomial posterior predictive: with a Beta(1/2, b) prior
  whose mean is the flip rate of clean calibration copies (calibration meta `copy_mean`), the flips still to
  come are at most their Φ(z) quantile. Without that prior (older calibrations) it falls back to the z-bound
  with the Agresti-Coull-adjusted rate. Why a prior: a single flip in K copies already puts the fixed-K score
  past the threshold, so no prior-free bound can settle a clean clip before all K copies are in; clean clips
  flip in ~0.3 % of copies, which is what lets them stop early (docs/nccr.md, "Sequential testing"). The
  flips to come are predicted from the *near* flips seen (copies whose relative margin fell below the 1 %
  quantile of clean copies', calibration meta `near_flip`; flips included): a clip whose copies come close
  to flipping keeps drawing copies instead of settling clean on the luck of its first ones.

The bounds pass through the same standardisation and max as the score. The verdict is settled when the lower
bound of the score is above the threshold or its upper bound at or below it; at n = K it is the fixed-K verdict.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy.special import ndtr
from scipy.stats import betabinom

from nccr_guard.engine.calibration import Calibration
from nccr_guard.engine.perturb import RANDOM_FAMILIES, Perturbation
from nccr_guard.engine.score import (
    Scores,
    component_copies,
    confidence,
    reduce_copies,
    relative_margin,
    shared_margin,
    standardise,
)
from nccr_guard.engine.variants import Schedule, Variant

__all__ = ["Copies", "Schedule", "bounded_scores", "copies_of", "layout", "max_copies", "replay", "rounds", "settled"]


def max_copies(variant: Variant) -> int:
    """K: the most copies any noise family of the variant draws (0 when it has only squeezers)."""
    return max((p.copies for p in variant.perturbations if p.family in RANDOM_FAMILIES), default=0)


Copies = int | dict[str, int]  # copies per noise family after a round: one count for all, or per perturbation key


def copies_of(n: Copies, p: Perturbation) -> int:
    """The copies of noise family `p` that a round's count `n` includes (at most its own K)."""
    return min(n if isinstance(n, int) else n[p.key], p.copies)


def rounds(variant: Variant, schedule: Schedule) -> list[Copies]:
    """Copies per noise family after each round: first, first+step, ..., K (one round when K is 0). One count
    for all families, or with `schedule.first_by` a count per perturbation key."""
    k = max_copies(variant)
    if not schedule.first_by:
        n, out = min(schedule.first, k), []
        while True:
            out.append(n)
            if n >= k:
                return out
            n = min(n + schedule.step, k)
    noisy = [p for p in variant.perturbations if p.family in RANDOM_FAMILIES]
    plan: list[Copies] = []
    while not plan or any(plan[-1][p.key] < p.copies for p in noisy):
        step = len(plan) * schedule.step
        plan.append({p.key: min(schedule.first_for(p.family) + step, p.copies) for p in noisy})
    return plan


def layout(variant: Variant, n: Copies) -> np.ndarray:
    """Indices, into the fixed-K rows, of the rows a round's count `n` includes, in the variant's row order."""
    groups = variant.groups
    idx = [np.array([0])]
    for p in variant.perturbations:
        g = groups[p.key]
        idx.append(np.arange(g.start, g.start + (copies_of(n, p) if p.family in RANDOM_FAMILIES else 1)))
    return np.concatenate(idx)


def _partial(variant: Variant, n: Copies) -> Variant:
    """The variant with a round's count of copies per noise family: the rows `layout` picks, as a variant (each
    family capped at its own K, as `layout` caps it)."""
    noisy = [p.with_copies(copies_of(n, p)) if p.family in RANDOM_FAMILIES else p for p in variant.perturbations]
    return replace(variant, perturbations=tuple(noisy))


PRIOR_A = 0.5  # the Beta prior's first shape: Jeffreys-like mass near a zero flip rate


def _flips_to_come(total: np.ndarray, n: int, k: int, z: float, clean_rate: float) -> np.ndarray:
    """Φ(z)-quantile of the flips among the K-n copies still to come, under the Beta-Binomial posterior
    predictive with a Beta(1/2, b) prior of mean `clean_rate` (the clean calibration flip rate)."""
    b0 = PRIOR_A * (1 - clean_rate) / clean_rate
    return betabinom.ppf(ndtr(z), k - n, PRIOR_A + total, b0 + n - total)


def _bounds(
    per_copy: np.ndarray,
    raw: np.ndarray,
    unit: bool,
    clean_rate: float | None,
    n: int,
    k: int,
    z: float,
    near: np.ndarray | None = None,
):
    """(lo, hi) of the mean over K copies given the first n (per_copy: (B, n), every measure >= 0).

    `clean_rate`: for a 0/1 measure, the clean calibration rate (None: not 0/1, or no rate recorded).
    `near`: (B,) near-flips seen so far (copies whose margin fell below the clean copies' low quantile, flips
    included); the flips to come are then predicted from them, not from the flips alone."""
    total = per_copy.sum(1)
    if clean_rate is not None:
        seen = total if near is None else np.maximum(near, total)
        return total / k, (total + _flips_to_come(seen, n, k, z, clean_rate)) / k
    if unit and n > 0 and np.isin(per_copy, (0.0, 1.0)).all():  # 0/1 without a prior: Agresti-Coull spread
        p = (total + z * z / 2) / (n + z * z)
        sd = np.sqrt(p * (1 - p))
    else:
        sd = per_copy.std(1, ddof=1) if n > 1 else np.full(len(raw), np.inf)
    se = sd * np.sqrt((k - n) / (k * n))
    lo, hi = np.maximum(raw - z * se, total / k), raw + z * se
    return lo, np.minimum(hi, (total + k - n) / k) if unit else hi


def bounded_scores(
    variant: Variant, calib: Calibration, acts: dict[str, np.ndarray], n: Copies, z: float
) -> tuple[Scores, np.ndarray, np.ndarray]:
    """Scores after a round's n copies per noise family, with (B,) lower and upper bounds on the fixed-K score.

    acts: layer -> (B, R_n, N) in `layout(variant, n)` row order; `variant` itself is the fixed-K one."""
    part = _partial(variant, n)
    groups = part.groups
    family = {p.key: p for p in variant.perturbations}
    pred = acts["logits"][:, 0].argmax(-1)
    margin = shared_margin(variant, acts, pred)
    raws, los, his = [], [], []
    rates = calib.meta.get("copy_mean")
    near_at = calib.meta.get("near_flip")
    with np.errstate(divide="ignore", invalid="ignore"):
        for i, comp in enumerate(variant.components):
            per = component_copies(comp, acts, calib, groups[comp.perturbation], pred, margin).astype(np.float64)
            raw = reduce_copies(comp, per)
            p = family[comp.perturbation]
            seen = copies_of(n, p) if p.family in RANDOM_FAMILIES else 0
            if p.family not in RANDOM_FAMILIES or seen >= p.copies:
                lo = hi = raw
            elif comp.reduce == "max":
                lo, hi = raw, np.full_like(raw, np.inf)
            else:
                rate = rates[i] if rates and comp.measure == "pred_flip" else None
                rate = None if rate is None else min(max(rate, 1e-6), 0.5)
                near = None
                if rate is not None and near_at and near_at[i] is not None and margin is not None:
                    near = (relative_margin(margin, groups[comp.perturbation]) < near_at[i]).sum(1)
                lo, hi = _bounds(per, raw, comp.measure in ("pred_flip", "flip"), rate, seen, p.copies, z, near)
            raws.append(raw)
            los.append(lo)
            his.append(hi)

        def combined(values: list[np.ndarray]) -> np.ndarray:
            return standardise(np.stack(values, -1), calib.comp_mu, calib.comp_sigma)

        scores = Scores(combined(raws), np.stack(raws, -1), pred, confidence(acts, pred))
        return scores, combined(los), combined(his)


def settled(lo: np.ndarray, hi: np.ndarray, threshold: float) -> np.ndarray:
    """Inputs whose fixed-K verdict (score > threshold) the bounds already decide."""
    return (lo > threshold) | (hi <= threshold)


def replay(
    variant: Variant, calib: Calibration, acts: dict[str, np.ndarray], schedule: Schedule
) -> tuple[Scores, np.ndarray]:
    """The sequential test over fixed-K activations (layer -> (B, R, N)): (scores, rows used per input).

    The same decisions the detector makes online, where only the rows of rounds that run are forwarded; the
    evaluation uses it to compare sequential and fixed-K verdicts on identical copies."""
    b = len(acts["logits"])
    n_comp = len(variant.components)
    score, raw = np.zeros(b), np.zeros((b, n_comp))
    pred, conf, passes = np.zeros(b, np.int64), np.zeros(b), np.zeros(b, np.int64)
    active = np.arange(b)
    plan = rounds(variant, schedule)
    for i, n in enumerate(plan):
        idx = layout(variant, n)
        s, lo, hi = bounded_scores(variant, calib, {k: v[active][:, idx] for k, v in acts.items()}, n, schedule.z)
        stop = settled(lo, hi, calib.threshold) | (i == len(plan) - 1)
        done = active[stop]
        score[done], raw[done] = s.score[stop], s.raw[stop]
        pred[done], conf[done] = s.prediction[stop], s.confidence[stop]
        passes[done] = len(idx)
        active = active[~stop]
    return Scores(score, raw, pred, conf), passes
