"""Seeded training of the small image models: plain, Gaussian-noise augmented, or PGD adversarial training.

Used by models/mnist/train.py (the default model) and the model-level robustness study."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels: cheap and enough for MNIST-like generalisation from 3,250 digits."""
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def colour_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Photo crops (B, 3, H, W) in [0, 1]: each flipped left-right at random, its brightness and contrast scaled
    by U(0.9, 1.1) and each channel by U(0.95, 1.05). Scale jitter is in the train split itself (photo_crops)."""
    b = len(x)
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    bright, contrast = (0.9 + 0.2 * torch.rand(2, b, 1, 1, 1, generator=gen)).unbind(0)
    channel = 0.95 + 0.1 * torch.rand(b, 3, 1, 1, generator=gen)
    mean = x.mean((1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean * bright).mul(channel).clamp(0, 1)


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
    augment: Augment = augment,
    weight_decay: float = 0.0,
) -> torch.nn.Module:
    """Adam (AdamW with `weight_decay`) with a one-cycle schedule, batches of 64; `augment` each batch (default:
    MNIST's random shifts)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    params = model.parameters()
    opt = torch.optim.AdamW(params, 1e-3, weight_decay=weight_decay) if weight_decay else torch.optim.Adam(params, 1e-3)
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
