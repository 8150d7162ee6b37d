"""Write an evaluation's files: eval.json (stable schema), eval.md (tables), roc.png, scores.png."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np


def machine() -> str:
    """The host as reports record it: architecture, processor (where the platform names one), torch threads."""
    import torch

    host = " ".join(filter(None, [platform.machine(), platform.processor()]))
    return f"{host}, torch {torch.get_num_threads()} threads"


def detectors(result: dict) -> list[str]:
    """The detectors scored in this run, NCCR first (the baselines differ per modality)."""
    names = {d for a in result["attacks"].values() for d in a["detectors"]}
    first = [d for d in ("nccr", "nccr_seq") if d in names or d == "nccr"]
    return [*first, *sorted(names - set(first))]


def _md(result: dict) -> str:
    names = detectors(result)
    audio = result.get("modality") == "audio"
    size = "median SNR dB" if audio else "mean L2"
    lines = [
        f"# Detection on {result['model']} ({result['split']} split), NCCR variant `{result['variant']}`",
        "",
        f"Command: `{result['command']}` · seed {result['seed']} · machine: {result['machine']} · "
        f"{result['seconds']} s",
        "",
        f"Clean inputs: {result['n_clean']} correctly classified (accuracy {result['clean_accuracy']:.3f}). "
        "Adversarial: successful ones only. TPR at the threshold fixed on the calib split's clean data (5 % FPR).",
        "",
        f"| attack | family / strength | success | n | {size} | mean L∞ | wrong-class margin | "
        + " | ".join(f"{d} AUROC / TPR" for d in names)
        + " |",
        "|---" * (7 + len(names)) + "|",
    ]
    for name, a in result["attacks"].items():
        cells = []
        for d in names:
            m = a["detectors"].get(d)
            cells.append(f"{m['auroc']:.3f} / {m['tpr_at_fpr05']:.3f}" if m else "–")
        key = "median_snr_db" if audio else "mean_l2"
        l2 = f"{a[key]:.2f}" if a.get(key) is not None else "–"
        li = f"{a['mean_linf']:.4f}" if a["mean_linf"] is not None else "–"
        wm = f"{a['mean_wrong_margin']:.1f}" if a.get("mean_wrong_margin") is not None else "–"
        fam = f"{a.get('family', '–')} / {a.get('strength', '–')}"
        lines.append(
            f"| {name} | {fam} | {a['success_rate']:.2f} | {a['n_adversarial']} | {l2} | {li} | {wm} | "
            + " | ".join(cells)
            + " |"
        )
    fpr = {d: next(iter(result["attacks"].values()))["detectors"][d]["fpr"] for d in names} if result["attacks"] else {}
    lines += [
        "",
        "False-positive rate on this split's clean inputs at the calib threshold: "
        + ", ".join(f"{d} {v:.3f}" for d, v in fpr.items()),
        "",
        "Worst attack per detector (lowest AUROC): "
        + ", ".join(f"{d} {w[1]} ({w[0]:.3f})" for d, w in worst(result, names).items()),
    ]
    if shifted := result.get("benign_shifts"):
        cols = [d for d in names if d in next(iter(shifted.values()))] + ["nccr_ood"]
        fits = any(r.get("fitted") for r in shifted.values())
        lines += [
            "",
            "## False alarms on benign shifts and out-of-distribution inputs",
            "",
            "Share of this split's clean inputs each detector flags after a benign shift, at its calib-fixed "
            "threshold (goal <= 0.10 for every shift); `nccr_ood`: share NCCR marks out of distribution. "
            + (
                "Shifts marked * were among the negatives the logistic combiner was fitted on (on dev inputs); "
                "the others it never saw."
                if fits
                else f"`{result['variant']}` is fitted on no shift."
            ),
            "",
            "| shift | " + " | ".join(cols) + " |",
            "|---" * (1 + len(cols)) + "|",
        ]
        for name, r in shifted.items():
            mark = "*" if r.get("fitted") else ""
            lines.append(f"| {name}{mark} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
        lines += ["", "| not an input | " + " | ".join(cols) + " |", "|---" * (1 + len(cols)) + "|"]
        for name, r in result["ood_inputs"].items():
            lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    if seq := result.get("sequential"):
        rows = ", ".join(f"{k} {v:.1f}" for k, v in seq["mean_rows"].items())
        lines += [
            "",
            f"`nccr_seq`: the same verdicts under sequential testing (schedule {seq['schedule']}), replayed over "
            f"the same noise copies. Mean rows per verdict (fixed K: {seq['fixed_rows']}): {rows}.",
        ]
    return "\n".join(lines) + "\n"


def worst(result: dict, names: list[str]) -> dict[str, tuple[float, str]]:
    """Per detector, (AUROC, attack) of the attack it does worst on: the number a user facing unknown attacks
    should read."""
    out = {}
    for d in names:
        scored = [(a["detectors"][d]["auroc"], n) for n, a in result["attacks"].items() if d in a["detectors"]]
        if scored:
            out[d] = min(scored)
    return out


def _roc(clean: np.ndarray, adv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    thr = np.unique(np.concatenate([clean, adv]))[::-1]
    return (np.array([0, *[(clean >= t).mean() for t in thr]]), np.array([0, *[(adv >= t).mean() for t in thr]]))


def _plots(result: dict, raw: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["attacks"])
    cols = max(1, min(4, len(names)))
    rows = (len(names) + cols - 1) // cols
    for kind in ("roc", "scores"):
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names, strict=False):
            for d in detectors(result):
                c, a = np.asarray(raw["clean"][d]), np.asarray(raw[name][d])
                if not len(a):
                    continue
                if kind == "roc":
                    fpr, tpr = _roc(c, a)
                    ax.plot(fpr, tpr, label=f"{d} {result['attacks'][name]['detectors'][d]['auroc']:.3f}")
                elif d == "nccr":
                    bins = np.linspace(min(c.min(), a.min()), max(c.max(), a.max()), 40)
                    ax.hist(c, bins, alpha=0.6, label="clean", density=True)
                    ax.hist(a, bins, alpha=0.6, label="adversarial", density=True)
                    ax.axvline(result["thresholds"]["nccr"], color="k", ls="--", lw=1, label="threshold")
            ax.set_title(name)
            ax.legend(fontsize=7)
            ax.set_xlabel("false-positive rate" if kind == "roc" else "NCCR score")
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / f"{kind}.png", dpi=80)
        plt.close(fig)


def write_report(result: dict, raw: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    (out / "eval.md").write_text(_md(result))
    (out / "scores.json").write_text(json.dumps(raw) + "\n")  # per-input scores: plots and re-analysis
    if result["attacks"]:
        _plots(result, raw, out)
