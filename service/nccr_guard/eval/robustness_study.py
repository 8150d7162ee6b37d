"""Model-level NCCR against robust accuracy: does a lower NCCR over clean data mean a more robust model?

    python -m nccr_guard.eval.robustness_study --out reports/robustness

Trains MNIST models with one recipe (nccr_guard.training) and different robustness (standard, Gaussian-noise
augmentation, PGD adversarial training at several eps), calibrates each with the default variant, and measures
on the held-out split: the model-level NCCR (`nccr-guard robustness`) and the accuracy under ART PGD-L∞.

The measure once in use came out inverted on the first five models; since then a fixed list of NCCR candidates
(CANDIDATES: cover flips of each class's characteristic neurons, the decision neuron's relative margin drop,
and prediction flips, each under 1-bit squeezing and under Gaussian and uniform noise at two scales) is
measured on every model; the rule, fixed before any candidate was measured, picks the candidate with the
highest Spearman correlation on the first five models (DEV_RECIPES) at the primary eps, and the claim is its
correlation on five models trained afterwards with other strengths (HELDOUT_RECIPES). The chosen one became
`nccr-v3`'s model-level measure. Trained models are cached under $NCCR_GUARD_CACHE/robustness (by recipe,
epochs and seed; delete them after changing the training code).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from nccr_guard.calibrate import activations, calibrate, robustness
from nccr_guard.datasets import load_split
from nccr_guard.detector import Detector
from nccr_guard.engine.calibration import fit_neuron_stats
from nccr_guard.engine.perturb import Perturbation, row_groups
from nccr_guard.engine.score import component_raw
from nccr_guard.engine.variants import Component, Variant
from nccr_guard.eval.attacks import art_classifier
from nccr_guard.export import export_onnx
from nccr_guard.manifest import load_manifest
from nccr_guard.nets import MnistCNN
from nccr_guard.training import accuracy, train

DEV_RECIPES = {  # name -> training keyword arguments; the first study's five models
    "standard": {},
    "noise-0.3": {"noise": 0.3},
    "pgd-0.1": {"adv_eps": 0.1},
    "pgd-0.2": {"adv_eps": 0.2},
    "pgd-0.3": {"adv_eps": 0.3},
}
HELDOUT_RECIPES = {  # trained after the candidate rule was fixed: the claim
    "noise-0.1": {"noise": 0.1},
    "noise-0.5": {"noise": 0.5},
    "pgd-0.05": {"adv_eps": 0.05},
    "pgd-0.15": {"adv_eps": 0.15},
    "pgd-0.25": {"adv_eps": 0.25},
}
PGD_EPS = (0.1, 0.2)
PRIMARY_EPS = 0.2
CANDIDATE_K = 16
# Candidate model-level measures, fixed before measuring any: three NCCR readings x five perturbations.
CANDIDATE_PERTURBATIONS = (
    Perturbation("bitdepth", 1),
    Perturbation("gaussian", 0.1, CANDIDATE_K),
    Perturbation("gaussian", 0.3, CANDIDATE_K),
    Perturbation("uniform", 0.1, CANDIDATE_K),
    Perturbation("uniform", 0.2, CANDIDATE_K),
)
READINGS = (("*", "flip", "class"), ("logits", "margin", "all"), ("logits", "pred_flip", "all"))
CANDIDATES = tuple(
    Component(p.key, layer, measure, selection, "mean")
    for p in CANDIDATE_PERTURBATIONS
    for layer, measure, selection in READINGS
)
CANDIDATE_VARIANT = Variant(
    name="robustness-candidates",
    perturbations=CANDIDATE_PERTURBATIONS,
    components=CANDIDATES,
    robustness=CANDIDATES[0],
)


def cache_root() -> Path:
    return Path(os.environ.get("NCCR_GUARD_CACHE", Path.home() / ".cache" / "nccr-guard")) / "robustness"


def robust_accuracy(module: torch.nn.Module, x: np.ndarray, y: np.ndarray, eps: float, seed: int) -> float:
    from art.attacks.evasion import ProjectedGradientDescent

    np.random.seed(seed)
    clf = art_classifier(module, (1, 28, 28), 10, (0.0, 1.0))
    adv = ProjectedGradientDescent(
        clf, norm=np.inf, eps=eps, eps_step=eps / 8, max_iter=40, num_random_init=0, batch_size=128, verbose=False
    ).generate(x)
    return float((clf.predict(adv).argmax(1) == y).mean())


def make_model(src: Path, dst: Path, recipe: dict, epochs: int, seed: int) -> torch.nn.Module:
    """Train, export and calibrate a model into `dst`, or load it from there when a previous run left it."""
    if (dst / "calibration.npz").exists():
        model = MnistCNN()
        model.load_state_dict(torch.load(dst / "weights.pt", weights_only=True))
        return model.eval()
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.pt", "*.onnx", "*.npz", "*.json", "*.py"))
    manifest = load_manifest(dst)
    x, y = load_split(manifest, "train")
    torch.manual_seed(seed)
    model = train(MnistCNN(), x, y, epochs, seed, **recipe)
    torch.save(model.state_dict(), dst / "weights.pt")
    export_onnx(model, dst / "model.onnx", (1, 28, 28), manifest.watch)
    calibrate(dst, seed=seed)
    return model


def candidate_values(folder: Path, seed: int) -> dict[str, float]:
    """Mean of every candidate over the clean held-out digits; neuron statistics (cover thresholds, each class's
    characteristic neurons) from the calib split, as `nccr-guard calibrate` fits them."""
    det = Detector.load(folder, backend="onnx", device="cpu", seed=seed, calibrated=False, truncate=False)
    det.variant = CANDIDATE_VARIANT
    stats = fit_neuron_stats(
        CANDIDATE_VARIANT, activations(det, load_split(det.manifest, "calib")[0]), len(det.manifest.labels)
    )
    acts = activations(det, load_split(det.manifest, "test")[0])
    pred = acts["logits"][:, 0].argmax(-1)
    groups = row_groups(CANDIDATE_VARIANT.perturbations)
    return {c.name: float(component_raw(c, acts, stats, groups[c.perturbation], pred).mean()) for c in CANDIDATES}


def spearman(rows: list[dict], key, eps: float) -> float:
    """Rank correlation of a per-model value with minus robust accuracy (1: lower value, more robust)."""
    return float(spearmanr([key(r) for r in rows], [-r[f"robust_accuracy_eps{eps}"] for r in rows]).statistic)


def measure_model(src: Path, name: str, recipe: dict, epochs: int, seed: int, xt, yt, group: str) -> dict:
    ta = time.perf_counter()
    folder = cache_root() / f"{name}-e{epochs}-s{seed}"
    model = make_model(src, folder, recipe, epochs, seed)
    acc_file = folder / f"robust-accuracy-n{len(xt)}.json"
    if acc_file.exists():
        robust = json.loads(acc_file.read_text())
    else:
        robust = {f"robust_accuracy_eps{eps}": robust_accuracy(model, xt, yt, eps, seed) for eps in PGD_EPS}
        acc_file.write_text(json.dumps(robust))
    rob = robustness(folder, split="test")
    # Exploratory (added after the first two models' primary numbers): the plain variant's noise measure.
    plain = calibrate(folder, variant="plain", seed=seed, write=False)
    return {
        "model": name,
        "group": group,
        "recipe": recipe,
        "epochs": epochs,
        "clean_accuracy": accuracy(model, xt, yt),
        "nccr": rob["nccr"],
        "nccr_measure": rob["measure"],
        "nccr_noise": plain.robustness,
        "nccr_noise_measure": "flip[*/class]@gaussian:0.1/mean, calib split",
        **robust,
        "candidates": candidate_values(folder, seed),
        "seconds": round(time.perf_counter() - ta, 1),
    }


def study(src: Path, out: Path, epochs: int, adv_epochs: int, seed: int, n: int) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    manifest = load_manifest(src)
    xt, yt = load_split(manifest, "test")
    xt, yt = xt[:n], yt[:n]
    rows = []
    for group, recipes in (("dev", DEV_RECIPES), ("held-out", HELDOUT_RECIPES)):
        for name, recipe in recipes.items():
            e = adv_epochs if "adv_eps" in recipe else epochs
            rows.append(measure_model(src, name, recipe, e, seed, xt, yt, group))
            print(json.dumps(rows[-1]), flush=True)
    dev = [r for r in rows if r["group"] == "dev"]
    held = [r for r in rows if r["group"] == "held-out"]
    samples = {"dev": dev, "held-out": held, "all": rows}
    corr = {f"eps{eps}": spearman(dev, lambda r: r["nccr"], eps) for eps in PGD_EPS}
    corr_noise = {f"eps{eps}": spearman(dev, lambda r: r["nccr_noise"], eps) for eps in PGD_EPS}
    primary = {g: {f"eps{e}": spearman(rs, lambda r: r["nccr"], e) for e in PGD_EPS} for g, rs in samples.items()}
    cands = {
        c.name: {
            g: {f"eps{e}": spearman(rs, lambda r, c=c: r["candidates"][c.name], e) for e in PGD_EPS}
            for g, rs in samples.items()
        }
        for c in CANDIDATES
    }
    # The rule: best dev correlation at the primary eps, then at the other eps; nan (a constant measure) last.
    # A tie beyond both goes to the first in CANDIDATES order (max keeps the first maximum): it happened, three
    # ways, and is stated with the result in reports/robustness/robustness.md.
    other = next(e for e in PGD_EPS if e != PRIMARY_EPS)

    def rank(name: str) -> tuple[float, float]:
        d = cands[name]["dev"]
        return tuple(-1.0 if np.isnan(v) else v for v in (d[f"eps{PRIMARY_EPS}"], d[f"eps{other}"]))

    chosen = max(cands, key=rank)
    result = {
        "command": f"python -m nccr_guard.eval.robustness_study --out {out} --seed {seed}",
        "seed": seed,
        "n_test": n,
        "primary_eps": PRIMARY_EPS,
        "models": rows,
        "spearman_nccr_vs_minus_robust_accuracy": corr,
        "spearman_nccr_noise_vs_minus_robust_accuracy": corr_noise,
        "spearman_primary_by_group": primary,
        "spearman_candidates": cands,
        "chosen_candidate": chosen,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "robustness.md").write_text(markdown(result))
    scatter(result, out / "scatter.png")
    return result


def markdown(r: dict) -> str:
    chosen = r["chosen_candidate"]
    lines = [
        "# Model-level NCCR vs robustness (MNIST)",
        "",
        f"`{r['command']}` — {r['n_test']} held-out digits, "
        f"{r['seconds']} s (trained models cached). Robust accuracy: ART PGD-L∞, 40 steps. Model NCCR: the "
        f"default variant's measure (`nccr-guard robustness`), `{r['models'][0]['nccr_measure']}`, averaged over "
        f"clean held-out digits (lower = more stable); chosen candidate: `{chosen}` (rule below). The first "
        "candidate below, `flip[*/class]@bitdepth:1/mean`, is the literal cover-flip rate.",
        "",
        "| model | group | epochs | clean acc | model NCCR | noise NCCR (exploratory) | chosen candidate | "
        + " | ".join(f"PGD ε={e} acc" for e in PGD_EPS)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(PGD_EPS),
    ]
    for m in r["models"]:
        lines.append(
            f"| {m['model']} | {m['group']} | {m['epochs']} | {m['clean_accuracy']:.3f} | {m['nccr']:.4f} | "
            f"{m['nccr_noise']:.4f} | {m['candidates'][chosen]:.4f} | "
            + " | ".join(f"{m[f'robust_accuracy_eps{e}']:.3f}" for e in PGD_EPS)
            + " |"
        )
    s = r["spearman_nccr_vs_minus_robust_accuracy"]
    lines += [
        "",
        "Spearman rank correlation between model NCCR and minus robust accuracy (1 = lower NCCR always "
        "means more robust), first five (dev) models: "
        + ", ".join(f"ε={k[3:]}: {v:.2f}" for k, v in s.items())
        + f" (primary ε={r['primary_eps']}; goal ≥ 0.9). Exploratory noise measure "
        f"(`{r['models'][0]['nccr_noise_measure']}`): "
        + ", ".join(f"ε={k[3:]}: {v:.2f}" for k, v in r["spearman_nccr_noise_vs_minus_robust_accuracy"].items())
        + ".",
        "",
        "## Candidates",
        "",
        "Fixed before any was measured (`CANDIDATES`: three readings × five perturbations, K = "
        f"{CANDIDATE_K} noise copies). Rule: the best Spearman correlation on the dev models at ε = "
        f"{r['primary_eps']}, then at the other ε; the claim is the chosen one's correlation on the five "
        "held-out models (trained with strengths the dev models do not have) and on all ten.",
        "",
        "| measure | " + " | ".join(f"{g} ρ ε={e}" for g in ("dev", "held-out", "all") for e in PGD_EPS) + " |",
        "|---|" + "---|" * (3 * len(PGD_EPS)),
    ]
    table = {"model NCCR (`nccr-guard robustness`)": r["spearman_primary_by_group"], **r["spearman_candidates"]}
    for name, by in table.items():
        cells = " | ".join(f"{by[g][f'eps{e}']:.2f}" for g in ("dev", "held-out", "all") for e in PGD_EPS)
        label = f"**`{name}`** (chosen)" if name == chosen else (f"`{name}`" if "@" in name else name)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines) + "\n"


def scatter(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = r["primary_eps"]
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4))
    chosen = r["chosen_candidate"]
    first = CANDIDATES[0].name  # the measure that came out inverted
    panels = ((first, lambda m: m["candidates"][first]), (chosen, lambda m: m["candidates"][chosen]))
    for ax, (label, value) in zip(axes, panels, strict=True):
        for m in r["models"]:
            ax.scatter(value(m), m[f"robust_accuracy_eps{eps}"], marker="o" if m["group"] == "dev" else "^")
            ax.annotate(m["model"], (value(m), m[f"robust_accuracy_eps{eps}"]), fontsize=7)
        ax.set_xlabel(f"{label} (clean held-out digits)", fontsize=8)
        ax.set_ylabel(f"accuracy under PGD ε={eps}")
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
