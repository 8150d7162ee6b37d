"""Leave-one-family-out formulation search: judge a formulation by the attack family it never saw.

    nccr-guard lofo --model models/mnist --n 200 --seed 0 --out reports/search/lofo

Every candidate component (eval.search's pool, plus the softmax's normalised change) is computed once on:
the calib split (statistics from half A, standardisation and thresholds from half B, half B also under the
calibration shifts of eval.shifts), and the dev split (clean digits, every benign shift, successful adversarial
examples of every attack in eval.attacks). The dev digits are split in two: *fit* digits (even positions) choose
or fit a formulation, *held-out* digits (odd positions) score it. For each attack family F, a method sees the
fit digits' adversarial examples of every family but F and is scored on the held-out digits' examples of F.

A method's figure of merit is its worst held-out family: the lowest AUROC (clean held-out digits against F's
adversarial ones, the worst attack within F), then the lowest TPR at the threshold it fixes from calib data.
Methods: greedy max-combinations of 1-5 standardised components (the served combiner), and logistic regression
over the components' z-scores. Threshold rules: `clean` (the calib clean 95 % quantile) and `clean+shifts` (no
lower than each calibration shift's quantile at SHIFT_FPR, so benign distortions keep their false alarms down).
The test split is never read here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nccr_guard.calibrate import activations
from nccr_guard.datasets import load_split
from nccr_guard.detector import Detector
from nccr_guard.engine import fit_calibration
from nccr_guard.engine.combiner import fit_logistic, linear
from nccr_guard.engine.score import EPS, raw_components
from nccr_guard.eval import shifts
from nccr_guard.eval.attacks import ATTACKS
from nccr_guard.eval.baselines import feature_squeezing
from nccr_guard.eval.metrics import auroc, rate_above
from nccr_guard.eval.search import candidate_variant
from nccr_guard.eval.sequential import adversarial

TARGET_FPR = 0.05
SHIFT_FPR = 0.07  # per calibration shift, on calib data: below the 10 % goal with room for sampling error
Z_CLIP = 30.0  # z-scores beyond this say "far outside clean" and no more; keeps a linear combiner bounded


@dataclass
class Data:
    """z-scores (n, n_components) per group, and the source digit of each row (for the fit / held-out split)."""

    names: list[str]
    calib_b: np.ndarray
    calib_shift: dict[str, np.ndarray]
    clean: np.ndarray
    shift: dict[str, np.ndarray]
    attack: dict[str, np.ndarray]
    attack_src: dict[str, np.ndarray]
    ood: dict[str, np.ndarray]
    fs: dict[str, np.ndarray]  # Feature Squeezing scores: "calib_b", "clean", "shift:<s>", "attack:<a>"


def threshold(rule: str, calib_b: np.ndarray, calib_shift: dict[str, np.ndarray]) -> float:
    t = float(np.quantile(calib_b, 1 - TARGET_FPR, method="higher"))
    if rule == "clean+shifts":
        t = max([t, *(float(np.quantile(v, 1 - SHIFT_FPR, method="higher")) for v in calib_shift.values())])
    return t


def source_index(x0: np.ndarray, adv: np.ndarray) -> np.ndarray:
    """Each adversarial example's clean digit: the nearest one (the cache keeps successful examples only)."""
    a, c = adv.reshape(len(adv), -1), x0.reshape(len(x0), -1)
    d = (a**2).sum(1)[:, None] - 2 * a @ c.T + (c**2).sum(1)[None]
    return d.argmin(1)


def collect(model: Path, n: int, seed: int, attacks: list[str], n_shift_calib: int = 150) -> Data:
    det = Detector.load(model, backend="torch", device="cpu", seed=seed, calibrated=False, truncate=False)
    x0, advs = adversarial(det, "dev", n, seed, attacks)
    det.variant = variant = candidate_variant(det.manifest.watch, det.manifest.modality)
    xc, _ = load_split(det.manifest, "calib")
    acts = activations(det, xc, desc="calib rows")
    half_a, half_b = ({k: v[i::2] for k, v in acts.items()} for i in (0, 1))
    calib = fit_calibration(variant, half_a, half_b, len(det.manifest.labels))
    vr = tuple(det.manifest.input.range)

    def z(xs: np.ndarray, desc: str) -> np.ndarray:
        raw, _ = raw_components(variant, calib, activations(det, xs, desc=desc))
        return np.clip((np.log(raw + EPS) - calib.comp_mu) / calib.comp_sigma, -Z_CLIP, Z_CLIP)

    xb = xc[1::2][:n_shift_calib]
    fs = {"calib_b": feature_squeezing(det, xc[1::2]), "clean": feature_squeezing(det, x0)}
    calib_shift, shift = {}, {}
    for i, s in enumerate(shifts.SHIFTS):
        if s in shifts.CALIBRATION_SHIFTS:
            xs = shifts.apply(s, xb, seed + i, vr)
            calib_shift[s], fs[f"calib_shift:{s}"] = z(xs, s), feature_squeezing(det, xs)
        xs = shifts.apply(s, x0, seed + 100 + i, vr)
        shift[s], fs[f"shift:{s}"] = z(xs, s), feature_squeezing(det, xs)
    for a, xa in advs.items():
        fs[f"attack:{a}"] = feature_squeezing(det, xa)
    zb = np.clip(
        (np.log(raw_components(variant, calib, half_b)[0] + EPS) - calib.comp_mu) / calib.comp_sigma, -Z_CLIP, Z_CLIP
    )
    return Data(
        names=list(variant.component_names),
        calib_b=zb,
        calib_shift=calib_shift,
        clean=z(x0, "dev clean"),
        shift=shift,
        attack={a: z(xa, a) for a, xa in advs.items()},
        attack_src={a: source_index(x0, xa) for a, xa in advs.items()},
        ood={k: z(v, k) for k, v in shifts.ood_inputs(50, x0.shape[1:], seed).items()},
        fs=fs,
    )


class Method:
    """A formulation fitted on some data: `fit` picks or learns, `score` maps z-scores to one score per row."""

    name: str

    def fit(self, neg: np.ndarray, pos: dict[str, np.ndarray]) -> Method:  # pragma: no cover - interface
        raise NotImplementedError

    def score(self, zs: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class GreedyMax(Method):
    """The served combiner: the max of `size` components, picked one at a time, each step maximising the worst
    (AUROC, then mean-free TPR proxy) over the training attacks, negatives = clean and shifted fit digits."""

    def __init__(self, size: int, start: list[int] | None = None, fixed: bool = False, label: str = "") -> None:
        self.size, self.idx, self.fixed = size, list(start or []), fixed
        self.name = label or f"greedy-max-{size}"

    def fit(self, neg: np.ndarray, pos: dict[str, np.ndarray]) -> GreedyMax:
        if self.fixed:
            return self
        picked: list[int] = []
        cand = _prefilter(neg, pos)
        for _ in range(self.size):
            best = max((c for c in cand if c not in picked), key=lambda c: _worst(neg, pos, [*picked, c]))
            picked.append(best)
        out = GreedyMax(self.size, picked, True, self.name)
        return out

    def score(self, zs: np.ndarray) -> np.ndarray:
        return zs[:, self.idx].max(1)


class Logistic(Method):
    """Logistic regression over the z-scores of the `top` components that are best alone on the training
    attacks (class-balanced, L2 with strength `c`)."""

    def __init__(self, top: int = 30, c: float = 0.1, allowed: list[int] | None = None, label: str = "") -> None:
        self.top, self.c, self.allowed = top, c, allowed
        self.name = label or f"logistic-top{top}-C{c:g}"

    def fit(self, neg: np.ndarray, pos: dict[str, np.ndarray]) -> Logistic:
        self.idx = _prefilter(neg, pos, self.top, self.allowed)
        self.w, self.b = fit_logistic(neg[:, self.idx], [v[:, self.idx] for v in pos.values()], self.c)
        return self

    def score(self, zs: np.ndarray) -> np.ndarray:
        return linear(zs[:, self.idx], self.w, self.b)


def _worst(neg: np.ndarray, pos: dict[str, np.ndarray], idx: list[int]) -> tuple[float, float]:
    sn = neg[:, idx].max(1)
    t = np.quantile(sn, 1 - TARGET_FPR)
    per = [(auroc(sn, p[:, idx].max(1)), rate_above(p[:, idx].max(1), t)) for p in pos.values()]
    return round(min(a for a, _ in per), 3), min(r for _, r in per)


def _prefilter(
    neg: np.ndarray, pos: dict[str, np.ndarray], top: int = 60, allowed: list[int] | None = None
) -> list[int]:
    """The `top` components (of `allowed`, default all) that are best alone (worst training attack): the
    greedy's and the regression's pool."""
    pool_ = range(neg.shape[1]) if allowed is None else allowed
    if top >= len(pool_):
        return list(pool_)
    ranked = sorted(pool_, key=lambda i: _worst(neg, pos, [i]), reverse=True)
    return ranked[:top]


def families_of(attacks: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for a in attacks:
        out.setdefault(ATTACKS[a].family, []).append(a)
    return out


def split_rows(d: Data, which: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Clean rows, shifted rows and adversarial rows of the fit (0) or held-out (1) digits."""
    keep = np.arange(len(d.clean)) % 2 == which
    return (
        d.clean[keep],
        {s: v[keep] for s, v in d.shift.items()},
        {a: v[keep[d.attack_src[a]]] for a, v in d.attack.items()},
    )


def scored(method: Method, d: Data, rule: str, attacks: list[str], which: int = 1) -> dict:
    """AUROC / TPR per attack, clean and per-shift FPR of a fitted method on the `which` digits."""
    clean, shifted, adv = split_rows(d, which)
    t = threshold(rule, method.score(d.calib_b), {s: method.score(v) for s, v in d.calib_shift.items()})
    sc = method.score(clean)
    out = {
        "attacks": {
            a: {"auroc": auroc(sc, method.score(adv[a])), "tpr": rate_above(method.score(adv[a]), t)}
            for a in attacks
            if len(adv[a])
        },
        "fpr_clean": rate_above(sc, t),
        "fpr_shift": {s: rate_above(method.score(v), t) for s, v in shifted.items()},
        "ood_flagged": {k: rate_above(method.score(v), t) for k, v in d.ood.items()},
    }
    return out


def lofo(d: Data, methods: list[Method], rules: list[str], attacks: list[str]) -> list[dict]:
    fams = families_of(attacks)
    clean_f, shift_f, adv_f = split_rows(d, 0)
    neg = np.concatenate([clean_f, *(shift_f[s] for s in shifts.CALIBRATION_SHIFTS)])
    rows = []
    for m in methods:
        for rule in rules:
            folds = {}
            for fam, held in fams.items():
                train = {a: v for a, v in adv_f.items() if a not in held and len(v)}
                fitted = m.fit(neg, train)
                s = scored(fitted, d, rule, held)
                worst = min(s["attacks"].items(), key=lambda kv: (kv[1]["auroc"], kv[1]["tpr"]))
                folds[fam] = {"attack": worst[0], **worst[1], "picked": _picked(fitted, d)}
            wf = min(folds, key=lambda f: (folds[f]["auroc"], folds[f]["tpr"]))
            rows.append(
                {
                    "method": m.name,
                    "rule": rule,
                    "worst_family": wf,
                    "worst_auroc": folds[wf]["auroc"],
                    "worst_tpr": min(f["tpr"] for f in folds.values()),
                    "folds": folds,
                }
            )
            print(json.dumps({k: rows[-1][k] for k in ("method", "rule", "worst_family", "worst_auroc", "worst_tpr")}))
    return rows


def _picked(m: Method, d: Data) -> list[str]:
    return [d.names[i] for i in getattr(m, "idx", [])]


def fixed(d: Data, names: list[str], label: str) -> GreedyMax:
    return GreedyMax(len(names), [d.names.index(n) for n in names], fixed=True, label=label)
