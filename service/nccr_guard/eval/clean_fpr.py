"""Does the calibrated threshold keep its promise? The clean false-positive rate on held-out clean splits.

The verdict threshold is the (1 - target) quantile of clean calibration scores, so on clean inputs it never saw it
should flag about `target_fpr` of them. This scores every clip of the named splits once (fixed K, and the
sequential test replayed over the same rows where the variant has one) and reports, per split and pooled, the rate
flagged with a 95 % Clopper-Pearson interval: over correctly classified inputs (what the attack reports count)
and over all. `--data` takes folders of clean files instead (your own model: no labels, so every input counts as
correct). `--calibration` adds other calibration files to score the same activations with (an older fit, a
different calibration set), so thresholds are compared on identical copies.

    python -m nccr_guard.eval.clean_fpr --model models/speaker --splits dev test holdout holdout2 holdout3 \\
        --calibration calib400=reports/speaker/clean-fpr/calibration-calib400.npz --out reports/speaker/clean-fpr
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import beta

from nccr_guard.calibrate import activations
from nccr_guard.datasets import load_folder, load_split
from nccr_guard.detector import Detector
from nccr_guard.engine import Calibration, score_rows
from nccr_guard.engine.sequential import replay
from nccr_guard.eval.report import machine


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval: no normal approximation, which fails at rates near 0 with a few hundred clips."""
    a = (1 - level) / 2
    lo = float(beta.ppf(a, k, n - k + 1)) if k else 0.0
    hi = float(beta.ppf(1 - a, k + 1, n - k)) if k < n else 1.0
    return lo, hi


def rate(flagged: np.ndarray) -> dict:
    k, n = int(flagged.sum()), len(flagged)
    lo, hi = clopper_pearson(k, n)
    return {"flagged": k, "n": n, "fpr": k / n if n else float("nan"), "ci95": [lo, hi]}


def flags(det: Detector, calib: Calibration, acts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs flagged at the calibrated threshold: fixed K, and sequential where the variant tests sequentially."""
    out = {"fixed": score_rows(det.variant, calib, acts).score > calib.threshold}
    if det.variant.sequential:
        out["sequential"] = replay(det.variant, calib, acts, det.variant.sequential)[0].score > calib.threshold
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--splits", nargs="+", default=[], help="held-out clean splits of the manifest")
    ap.add_argument(
        "--data",
        nargs="+",
        type=Path,
        default=[],
        help="folders of held-out clean files (no labels: every input counts as correctly classified)",
    )
    ap.add_argument(
        "--calibration",
        nargs="*",
        default=[],
        metavar="NAME=PATH",
        help="other calibration.npz files of the same variant to score the same rows with",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not args.splits and not args.data:
        ap.error("name --splits or --data")
    t0 = time.perf_counter()
    det = Detector.load(args.model, device="cpu", seed=args.seed, sequential=False)
    assert det.calib is not None
    calibs = {"model": det.calib}
    for spec in args.calibration:
        name, _, path = spec.partition("=")
        calibs[name] = c = Calibration.load(Path(path))
        if c.variant != det.variant.name:
            ap.error(f"{path}: variant {c.variant}, the model's is {det.variant.name}")
    per_split: dict[str, dict] = {}
    pooled: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in calibs}
    ok_all = []
    sources = [(s, lambda s=s: load_split(det.manifest, s)) for s in args.splits]
    sources += [(str(d), lambda d=d: (load_folder(d, det.manifest)[0], None)) for d in args.data]
    for split, load in sources:
        xs, ys = load()
        acts = activations(det, xs, desc=split)
        pred = acts["logits"][:, 0].argmax(-1)
        ok = pred == ys if ys is not None else np.ones(len(xs), bool)
        ok_all.append(ok)
        per_split[split] = {"n": len(xs), "correct": int(ok.sum())}
        for name, calib in calibs.items():
            for mode, f in flags(det, calib, acts).items():
                pooled[name].setdefault(mode, []).append(f)
                per_split[split][f"{name}/{mode}"] = {"correct": rate(f[ok]), "all": rate(f)}
    ok = np.concatenate(ok_all)
    result = {
        "model": det.manifest.name,
        "variant": det.variant.name,
        "splits": [name for name, _ in sources],
        "seed": args.seed,
        "command": "python -m nccr_guard.eval.clean_fpr " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "calibrations": {
            name: {
                "threshold": c.threshold,
                "target_fpr": c.target_fpr,
                "n_clean": c.meta.get("n_clean"),
                "data": c.meta.get("data"),
            }
            for name, c in calibs.items()
        },
        "splits_detail": per_split,
        "pooled": {
            f"{name}/{mode}": {"correct": rate(np.concatenate(fs)[ok]), "all": rate(np.concatenate(fs))}
            for name, modes in pooled.items()
            for mode, fs in modes.items()
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "clean-fpr.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "clean-fpr.md").write_text(markdown(result))
    for key, r in result["pooled"].items():
        c = r["correct"]
        ci = [round(v, 4) for v in c["ci95"]]
        print(json.dumps({"calibration": key, "fpr": round(c["fpr"], 4), "n": c["n"], "ci95": ci}))
    print(f"wrote {args.out}/clean-fpr.json")


def markdown(result: dict) -> str:
    keys = list(result["pooled"])
    cell = lambda r: f"{r['fpr']:.3f} ({r['flagged']}/{r['n']}; {r['ci95'][0]:.3f}–{r['ci95'][1]:.3f})"  # noqa: E731
    lines = [
        f"# Clean false-positive rate: {result['model']} (`{result['variant']}`)",
        "",
        f"`{result['command']}` · seed {result['seed']} · {result['machine']} · {result['seconds']} s",
        "",
        "Rate of clean inputs flagged at each calibration's threshold, with a 95 % Clopper-Pearson interval: over "
        "the correctly classified ones (the inputs the attack reports start from), then over all of them. The "
        "threshold is a quantile of clean calibration scores whatever the model predicted (a folder of your own "
        "files has no labels), so *all* is the rate it promises; misclassified clean inputs sit near a decision "
        "boundary and are flagged more often, which puts the first rate below the second.",
        "",
        "| calibration | threshold | target | calibrated on |",
        "|---|---|---|---|",
        *(
            f"| {name} | {c['threshold']:.4f} | {c['target_fpr']:.2f} | {c['data']} ({c['n_clean']} clips) |"
            for name, c in result["calibrations"].items()
        ),
    ]
    for which, title in (("correct", "correctly classified"), ("all", "all clean inputs")):
        lines += [
            "",
            f"| split: {title} | clips (correct) | " + " | ".join(keys) + " |",
            "|---|---|" + "---|" * len(keys),
            *(
                f"| {split} | {d['n']} ({d['correct']}) | " + " | ".join(cell(d[k][which]) for k in keys) + " |"
                for split, d in result["splits_detail"].items()
            ),
            "| **pooled** | | " + " | ".join(f"**{cell(result['pooled'][k][which])}**" for k in keys) + " |",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
