"""The NCCR formulation search: every candidate component measured on the dev split with one attack.

Statistics come from the calib split; AUROC is measured on the dev split (clean vs successful adversarial of
one attack, fgsm by default). The test split is never touched here: `nccr-guard evaluate` reports it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from nccr_guard.calibrate import activations
from nccr_guard.datasets import load_split
from nccr_guard.detector import Detector
from nccr_guard.engine import Perturbation, Variant, fit_calibration, get_variant
from nccr_guard.engine.perturb import RANDOM_FAMILIES
from nccr_guard.engine.score import EPS, raw_components
from nccr_guard.engine.variants import IMAGE_NOISE, IMAGE_SQUEEZE, every_component
from nccr_guard.eval.attacks import attack_succeeded, attack_table, correctly_classified, run_attack
from nccr_guard.eval.metrics import auroc, rate_above, threshold_at_fpr

NOISE = {
    "image": IMAGE_NOISE,
    # audio: noise at an SNR relative to the clip, time shifts (5 and 25 ms at 16 kHz), gain jitter
    "audio": (
        *(Perturbation("snr", db, 8) for db in (20, 30, 40)),
        *(Perturbation("shift", n, 8) for n in (80, 400)),
        Perturbation("gain", 3, 8),
    ),
}
SQUEEZE = {
    "image": IMAGE_SQUEEZE,
    "audio": (*(Perturbation("bitdepth", b) for b in (8, 10, 12)), Perturbation("median", 3)),
}


def candidate_variant(layers: list[str], modality: str = "image") -> Variant:
    perturbations = (*NOISE[modality], *SQUEEZE[modality])
    comps = every_component(perturbations, [*layers, "logits", "*"])
    return Variant("search", perturbations, comps, robustness=comps[0])


def family(key: str) -> str:
    return "noise" if key.split(":")[0] in RANDOM_FAMILIES else "squeeze"


def search(
    model: Path,
    n: int = 500,
    seed: int = 0,
    out: Path = Path("reports/search"),
    attacks: tuple[str, ...] = ("fgsm",),
    start_from: str | None = None,
) -> dict:
    """Rank every candidate component (and greedy max-combinations) by its worst dev AUROC over `attacks`.
    `start_from`: a variant whose components (all of them among the candidates) the greedy selection starts
    with, so that its table shows what each added component buys against that variant."""
    t0 = time.perf_counter()
    det = Detector.load(model, backend="torch", device="cpu", seed=seed, calibrated=False, truncate=False)
    det.variant = variant = candidate_variant(det.manifest.watch, det.manifest.modality)
    start = _start_components(variant, start_from)
    table = attack_table(det.manifest)
    n_classes = len(det.manifest.labels)
    xc, _ = load_split(det.manifest, "calib")
    acts = activations(det, xc, desc="calib rows")
    calib = fit_calibration(
        variant, {k: v[0::2] for k, v in acts.items()}, {k: v[1::2] for k, v in acts.items()}, n_classes
    )
    zb = (
        np.log(raw_components(variant, calib, {k: v[1::2] for k, v in acts.items()})[0] + EPS) - calib.comp_mu
    ) / calib.comp_sigma
    clf, xd, yd, _ = correctly_classified(det, "dev", n)
    z_clean = zscores(det, calib, xd, "clean")
    z_adv, n_adv = {}, {}
    for attack in attacks:
        adv = run_attack(attack, clf, xd, seed, table)
        hit = attack_succeeded(attack, clf.predict(adv).argmax(1), yd, n_classes)
        z_adv[attack], n_adv[attack] = zscores(det, calib, adv[hit], attack), int(hit.sum())
    rows = []
    for i, c in enumerate(variant.components):
        per = {a: _metrics([i], z_clean, z_adv[a], zb) for a in attacks}
        rows.append(
            {
                "component": c.name,
                "family": family(c.perturbation),
                "index": i,
                "auroc": min(m[0] for m in per.values()),
                "tpr_at_fpr05": min(m[1] for m in per.values()),
                "per_attack": {a: {"auroc": m[0], "tpr_at_fpr05": m[1]} for a, m in per.items()},
            }
        )
    rows.sort(key=lambda r: (-r["auroc"], -r["tpr_at_fpr05"]))
    combos = greedy(rows, z_clean, z_adv, zb, start=start)
    result = {
        "model": det.manifest.name,
        "attacks": list(attacks),
        "seed": seed,
        "n_dev_clean": len(xd),
        "n_dev_adv": n_adv,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": f"nccr-guard search --model {model} --attacks {' '.join(attacks)} --n {n} --seed {seed}"
        + (f" --start-from {start_from}" if start_from else ""),
        "components": rows,
        "start_from": start_from,
        "combinations": combos,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "search.md").write_text(markdown(result))
    print(markdown(result, top=25))
    return result


def _start_components(candidates: Variant, name: str | None) -> list[int]:
    """Indices, among the candidates, of variant `name`'s components (refused if one is not a candidate)."""
    if name is None:
        return []
    index = {c.name: i for i, c in enumerate(candidates.components)}
    wanted = [c.name for c in get_variant(name).components]
    missing = [w for w in wanted if w not in index]
    if missing:
        raise ValueError(f"--start-from {name}: {', '.join(missing)} not among the search's candidates")
    return [index[w] for w in wanted]


def zscores(det: Detector, calib, xs: np.ndarray, desc: str) -> np.ndarray:
    raw, _ = raw_components(det.variant, calib, activations(det, xs, desc=desc))
    return (np.log(raw + EPS) - calib.comp_mu) / calib.comp_sigma


def _metrics(idx: list[int], z_clean: np.ndarray, z_adv: np.ndarray, zb: np.ndarray) -> tuple[float, float]:
    """AUROC and TPR at the threshold fixed on calib half B, of the max over components `idx`."""
    sc, sa, sb = (m[:, idx].max(1) for m in (z_clean, z_adv, zb))
    return auroc(sc, sa), rate_above(sa, threshold_at_fpr(sb))


def greedy(
    rows: list[dict], z_clean: np.ndarray, z_adv: dict, zb: np.ndarray, size: int = 4, start: list[int] = ()
) -> list:
    """Forward selection of max-combined components, each step maximising the worst (AUROC, TPR) over attacks;
    `start`: component indices picked before the first step (their combination is the first row)."""

    def worst(idx: list[int]) -> tuple[float, float]:
        per = [_metrics(idx, z_clean, z, zb) for z in z_adv.values()]
        return min(p[0] for p in per), min(p[1] for p in per)

    def row(picked: list[dict]) -> dict:
        idx = [p["index"] for p in picked]
        per = {
            name: dict(zip(("auroc", "tpr_at_fpr05"), _metrics(idx, z_clean, z, zb), strict=True))
            for name, z in z_adv.items()
        }
        a, t = (min(m[k] for m in per.values()) for k in ("auroc", "tpr_at_fpr05"))  # worst(idx), not recomputed
        return {"components": [p["component"] for p in picked], "auroc": a, "tpr_at_fpr05": t, "per_attack": per}

    by_index = {r["index"]: r for r in rows}
    picked: list[dict] = [by_index[i] for i in start]
    out = [row(picked)] if picked else []  # with a start, its own combination comes first
    for _ in range(size):
        best = max(
            (r for r in rows if r not in picked), key=lambda r: worst([p["index"] for p in picked] + [r["index"]])
        )
        picked.append(best)
        out.append(row(picked))
    return out


def markdown(result: dict, top: int | None = None) -> str:
    attacks = result["attacks"]
    lines = [
        f"# NCCR formulation search ({result['model']}, dev split, attacks {', '.join(attacks)})",
        "",
        f"`{result['command']}` — {result['n_dev_clean']} clean; successful adversarial: {result['n_dev_adv']}; "
        f"{result['seconds']} s. Statistics from the calib split; the test split is not used.",
        "",
        "Ranked by the worst AUROC over the attacks, then the worst TPR at the 5 % FPR threshold fixed on calib data.",
        "",
        "| component | family | " + " | ".join(f"{a} AUROC / TPR" for a in attacks) + " |",
        "|---|---|" + "---|" * len(attacks),
    ]
    for r in result["components"][:top]:
        cells = [f"{r['per_attack'][a]['auroc']:.3f} / {r['per_attack'][a]['tpr_at_fpr05']:.3f}" for a in attacks]
        lines.append(f"| `{r['component']}` | {r['family']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Greedy max-combinations"
        + (f" (from `{result['start_from']}`'s components: the first row)" if result.get("start_from") else ""),
        "",
        "| components | " + " | ".join(attacks) + " |",
        "|---|" + "---|" * len(attacks),
    ]
    for c in result["combinations"]:
        cells = [f"{c['per_attack'][a]['auroc']:.3f} / {c['per_attack'][a]['tpr_at_fpr05']:.3f}" for a in attacks]
        lines.append(f"| {'<br>'.join(f'`{n}`' for n in c['components'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
