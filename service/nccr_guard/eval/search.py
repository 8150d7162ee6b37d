"""The NCCR formulation search: every candidate component measured on the dev split with one attack.

Statistics come from the calib split; AUROC is measured on the dev split (clean vs successful adversarial of
one attack, fgsm by default). The test split is never touched here: `nccr-guard evaluate` reports it.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np

from nccr_guard.calibrate import activations
from nccr_guard.datasets import load_split
from nccr_guard.detector import Detector
from nccr_guard.engine import Component, Perturbation, Variant, fit_calibration
from nccr_guard.engine.score import EPS, raw_components
from nccr_guard.eval.attacks import art_classifier, run_attack
from nccr_guard.eval.metrics import auroc, rate_above, threshold_at_fpr

NOISE = (
    *(Perturbation("gaussian", s, 12) for s in (0.02, 0.05, 0.1, 0.2)),
    *(Perturbation("uniform", s, 12) for s in (0.1, 0.2)),
)
SQUEEZE = (*(Perturbation("bitdepth", b) for b in (1, 2, 3)), *(Perturbation("median", s) for s in (2, 3)))


def candidate_variant(layers: list[str]) -> Variant:
    comps = []
    for p in (*NOISE, *SQUEEZE):
        reduces = ("mean", "max") if p in NOISE else ("mean",)
        for layer, measure, sel, red in itertools.product(
            [*layers, "logits", "*"], ("flip", "change"), ("all", "class"), reduces
        ):
            comps.append(Component(p.key, layer, measure, sel, red))
        comps += [Component(p.key, "logits", m, "all", "mean") for m in ("pred_flip", "margin")]
    return Variant("search", (*NOISE, *SQUEEZE), tuple(comps), robustness=comps[0])


def family(key: str) -> str:
    return "noise" if key.split(":")[0] in ("gaussian", "uniform") else "squeeze"


def search(model: Path, n: int = 500, seed: int = 0, out: Path = Path("reports/search"), attack: str = "fgsm") -> dict:
    t0 = time.perf_counter()
    det = Detector.load(model, device="cpu", seed=seed, calibrated=False)
    det.variant = variant = candidate_variant(det.manifest.watch)
    n_classes = len(det.manifest.labels)
    xc, _ = load_split(det.manifest, "calib")
    acts = activations(det, xc, desc="calib rows")
    calib = fit_calibration(
        variant, {k: v[0::2] for k, v in acts.items()}, {k: v[1::2] for k, v in acts.items()}, n_classes
    )
    zb = (
        np.log(raw_components(variant, calib, {k: v[1::2] for k, v in acts.items()})[0] + EPS) - calib.comp_mu
    ) / calib.comp_sigma
    xd, yd = load_split(det.manifest, "dev")
    xd, yd = xd[:n], yd[:n]
    clf = art_classifier(det.backend.module, tuple(det.manifest.input.shape), n_classes, det.manifest.input.range)
    ok = clf.predict(xd).argmax(1) == yd
    adv = run_attack(attack, clf, xd[ok], seed)
    hit = clf.predict(adv).argmax(1) != yd[ok]
    z = {}
    for name, xs in (("clean", xd[ok]), ("adv", adv[hit])):
        raw, _ = raw_components(variant, calib, activations(det, xs, desc=name))
        z[name] = (np.log(raw + EPS) - calib.comp_mu) / calib.comp_sigma
    rows = []
    for i, c in enumerate(variant.components):
        thr = threshold_at_fpr(zb[:, i])
        rows.append(
            {
                "component": c.name,
                "family": family(c.perturbation),
                "auroc": auroc(z["clean"][:, i], z["adv"][:, i]),
                "tpr_at_fpr05": rate_above(z["adv"][:, i], thr),
                "index": i,
            }
        )
    rows.sort(key=lambda r: (-r["auroc"], -r["tpr_at_fpr05"]))
    combos = combinations(rows, z, zb)
    result = {
        "model": det.manifest.name,
        "attack": attack,
        "seed": seed,
        "n_dev_clean": int(ok.sum()),
        "n_dev_adv": int(hit.sum()),
        "seconds": round(time.perf_counter() - t0, 1),
        "command": f"nccr-guard search --model {model} --attack {attack} --n {n} --seed {seed}",
        "components": rows,
        "combinations": combos,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "search.md").write_text(markdown(result))
    print(markdown(result, top=25))
    return result


def _combo_metrics(idx: list[int], z: dict, zb: np.ndarray) -> tuple[float, float]:
    sc, sa, sb = (m[:, idx].max(1) for m in (z["clean"], z["adv"], zb))
    return auroc(sc, sa), rate_above(sa, threshold_at_fpr(sb))


def combinations(rows: list[dict], z: dict, zb: np.ndarray) -> list[dict]:
    """Max-of-z combinations: the best of each perturbation family together, and the best k components of each."""
    best = {f: [r for r in rows if r["family"] == f] for f in ("noise", "squeeze")}
    out = []
    for k_noise, k_sq in ((1, 1), (1, 2), (2, 2), (1, 4)):
        picked = best["noise"][:k_noise] + best["squeeze"][:k_sq]
        a, t = _combo_metrics([r["index"] for r in picked], z, zb)
        out.append({"components": [r["component"] for r in picked], "auroc": a, "tpr_at_fpr05": t})
    return out


def markdown(result: dict, top: int | None = None) -> str:
    lines = [
        f"# NCCR formulation search ({result['model']}, dev split, attack {result['attack']})",
        "",
        f"`{result['command']}` — {result['n_dev_clean']} clean, {result['n_dev_adv']} successful adversarial, "
        f"{result['seconds']} s",
        "",
        "| component | family | AUROC | TPR@5%FPR |",
        "|---|---|---|---|",
    ]
    for r in result["components"][:top]:
        lines.append(f"| `{r['component']}` | {r['family']} | {r['auroc']:.3f} | {r['tpr_at_fpr05']:.3f} |")
    lines += [
        "",
        "## Combinations (max of standardised components)",
        "",
        "| components | AUROC | TPR@5%FPR |",
        "|---|---|---|",
    ]
    for c in result["combinations"]:
        lines.append(
            f"| {'<br>'.join(f'`{n}`' for n in c['components'])} | {c['auroc']:.3f} | {c['tpr_at_fpr05']:.3f} |"
        )
    return "\n".join(lines) + "\n"
