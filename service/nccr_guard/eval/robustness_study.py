"""Model-level NCCR against robust accuracy: does a lower NCCR over clean data mean a more robust model?

    python -m nccr_guard.eval.robustness_study --out reports/robustness

Trains MNIST models with one recipe (nccr_guard.training) and different robustness (standard, Gaussian-noise
augmentation, PGD adversarial training at three eps), calibrates each with the default variant, and measures
on the held-out split: the model-level NCCR (`nccr-guard robustness`) and the accuracy under ART PGD-L∞.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from nccr_guard.calibrate import calibrate, robustness
from nccr_guard.datasets import load_split
from nccr_guard.eval.attacks import art_classifier
from nccr_guard.export import export_onnx
from nccr_guard.manifest import load_manifest
from nccr_guard.nets import MnistCNN
from nccr_guard.training import accuracy, train

RECIPES = {  # name -> training keyword arguments
    "standard": {},
    "noise-0.3": {"noise": 0.3},
    "pgd-0.1": {"adv_eps": 0.1},
    "pgd-0.2": {"adv_eps": 0.2},
    "pgd-0.3": {"adv_eps": 0.3},
}
PGD_EPS = (0.1, 0.2)
PRIMARY_EPS = 0.2


def robust_accuracy(module: torch.nn.Module, x: np.ndarray, y: np.ndarray, eps: float, seed: int) -> float:
    from art.attacks.evasion import ProjectedGradientDescent

    np.random.seed(seed)
    clf = art_classifier(module, (1, 28, 28), 10, (0.0, 1.0))
    adv = ProjectedGradientDescent(
        clf, norm=np.inf, eps=eps, eps_step=eps / 8, max_iter=40, num_random_init=0, batch_size=128, verbose=False
    ).generate(x)
    return float((clf.predict(adv).argmax(1) == y).mean())


def make_model(src: Path, dst: Path, recipe: dict, epochs: int, seed: int) -> torch.nn.Module:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.pt", "*.onnx", "*.npz", "*.json", "*.py"))
    manifest = load_manifest(dst)
    x, y = load_split(manifest, "train")
    torch.manual_seed(seed)
    model = train(MnistCNN(), x, y, epochs, seed, **recipe)
    torch.save(model.state_dict(), dst / "weights.pt")
    export_onnx(model, dst / "model.onnx", (1, 28, 28), manifest.watch)
    calibrate(dst, seed=seed)
    return model


def study(src: Path, out: Path, epochs: int, adv_epochs: int, seed: int, n: int) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    manifest = load_manifest(src)
    xt, yt = load_split(manifest, "test")
    xt, yt = xt[:n], yt[:n]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe in RECIPES.items():
            ta = time.perf_counter()
            e = adv_epochs if "adv_eps" in recipe else epochs
            model = make_model(src, Path(tmp) / name, recipe, e, seed)
            rob = robustness(Path(tmp) / name, split="test")
            # Exploratory (added after the first two models' primary numbers): the plain variant's noise measure.
            plain = calibrate(Path(tmp) / name, variant="plain", seed=seed, write=False)
            row = {
                "model": name,
                "recipe": recipe,
                "epochs": e,
                "clean_accuracy": accuracy(model, xt, yt),
                "nccr": rob["nccr"],
                "nccr_measure": rob["measure"],
                "nccr_noise": plain.robustness,
                "nccr_noise_measure": "flip[*/class]@gaussian:0.1/mean, calib split",
                **{f"robust_accuracy_eps{eps}": robust_accuracy(model, xt, yt, eps, seed) for eps in PGD_EPS},
                "seconds": round(time.perf_counter() - ta, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    nccr = [r["nccr"] for r in rows]
    corr = {
        f"eps{eps}": float(spearmanr(nccr, [-r[f"robust_accuracy_eps{eps}"] for r in rows]).statistic)
        for eps in PGD_EPS
    }
    corr_noise = {
        f"eps{eps}": float(
            spearmanr([r["nccr_noise"] for r in rows], [-r[f"robust_accuracy_eps{eps}"] for r in rows]).statistic
        )
        for eps in PGD_EPS
    }
    result = {
        "command": f"python -m nccr_guard.eval.robustness_study --out {out} --seed {seed}",
        "seed": seed,
        "n_test": n,
        "primary_eps": PRIMARY_EPS,
        "models": rows,
        "spearman_nccr_vs_minus_robust_accuracy": corr,
        "spearman_nccr_noise_vs_minus_robust_accuracy": corr_noise,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "robustness.md").write_text(markdown(result))
    scatter(result, out / "scatter.png")
    return result


def markdown(r: dict) -> str:
    lines = [
        "# Model-level NCCR vs robustness (MNIST)",
        "",
        f"`{r['command']}` — {r['n_test']} held-out digits, "
        f"{r['seconds']} s. Robust accuracy: ART PGD-L∞, 40 steps. NCCR: `{r['models'][0]['nccr_measure']}` "
        "averaged over clean held-out digits (lower = more stable).",
        "",
        "| model | epochs | clean acc | model NCCR (primary) | noise NCCR (exploratory) | "
        + " | ".join(f"PGD ε={e} acc" for e in PGD_EPS)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(PGD_EPS),
    ]
    for m in r["models"]:
        lines.append(
            f"| {m['model']} | {m['epochs']} | {m['clean_accuracy']:.3f} | {m['nccr']:.4f} | {m['nccr_noise']:.4f} | "
            + " | ".join(f"{m[f'robust_accuracy_eps{e}']:.3f}" for e in PGD_EPS)
            + " |"
        )
    s = r["spearman_nccr_vs_minus_robust_accuracy"]
    lines += [
        "",
        "Spearman rank correlation between model NCCR and minus robust accuracy (1 = lower NCCR always "
        "means more robust): "
        + ", ".join(f"ε={k[3:]}: {v:.2f}" for k, v in s.items())
        + f" (primary ε={r['primary_eps']}; goal ≥ 0.9). Exploratory noise measure "
        f"(`{r['models'][0]['nccr_noise_measure']}`): "
        + ", ".join(f"ε={k[3:]}: {v:.2f}" for k, v in r["spearman_nccr_noise_vs_minus_robust_accuracy"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def scatter(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    for m in r["models"]:
        ax.scatter(m["nccr"], m[f"robust_accuracy_eps{r['primary_eps']}"])
        ax.annotate(m["model"], (m["nccr"], m[f"robust_accuracy_eps{r['primary_eps']}"]), fontsize=7)
    ax.set_xlabel("model-level NCCR (clean held-out digits)")
    ax.set_ylabel(f"accuracy under PGD ε={r['primary_eps']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/mnist"), help="folder whose manifest/split to reuse")
    ap.add_argument("--out", type=Path, default=Path("reports/robustness"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--adv-epochs", type=int, default=12)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    study(a.model, a.out, a.epochs, a.adv_epochs, a.seed, a.n)


if __name__ == "__main__":
    main()
