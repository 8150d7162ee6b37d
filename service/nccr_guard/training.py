"""Seeded training of the small image models: plain, Gaussian-noise augmented, or PGD adversarial training.

Used by models/mnist/train.py (the default model) and the model-level robustness study."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels: cheap and enough for MNIST-like generalisation from 3,250 digits."""
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int) -> torch.Tensor:
    """In-loop PGD for adversarial *training* only (evaluation attacks come from ART)."""
    delta = torch.empty_like(x).uniform_(-eps, eps)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + 2.5 * eps / steps * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


def train(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    seed: int,
    noise: float = 0.0,
    adv_eps: float = 0.0,
) -> torch.nn.Module:
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
                model.eval()
                xb = pgd(model, xb, yb, adv_eps, steps=7)
                model.train()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.inference_mode():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
