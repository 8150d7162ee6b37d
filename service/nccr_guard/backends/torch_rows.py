"""The engine's perturbation families in torch, so rows are built on the GPU next to the model instead of
in numpy on the host (for a 224 px image at K=32 the host copy alone costs more than the forward).

Deterministic squeezers match `nccr_guard.engine.perturb` exactly (tested); noise families draw from torch's
generator, so on this path scores are reproducible for a given batch, not bit-identical to the numpy path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nccr_guard.engine.perturb import Perturbation, sweep_shifts


def median(x: torch.Tensor, size: int) -> torch.Tensor:
    """scipy.ndimage.median_filter(size over the last two axes, mode='reflect') for size <= 3."""
    left, right = size // 2, size - 1 - size // 2
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:])
    padded = F.pad(flat, (left, right, left, right), mode="replicate")  # = scipy 'reflect' for pads of 1
    patches = padded.unfold(2, size, 1).unfold(3, size, 1).reshape(*flat.shape, size * size)
    return patches.kthvalue(size * size // 2 + 1, dim=-1).values.reshape(*lead, *x.shape[-2:])


def perturb(x: torch.Tensor, p: Perturbation, gen: torch.Generator | None, lo: float, hi: float) -> torch.Tensor:
    """x: (B, *shape) -> (B, copies, *shape). `gen`: None where only squeezers run (backends/torch_verdict.py)."""
    b, shape, span = x.shape[0], x.shape[1:], hi - lo
    if p.family == "bitdepth":
        levels = 2 ** int(p.scale) - 1
        return (torch.round((x - lo) / span * levels) / levels * span + lo)[:, None]
    if p.family == "median":
        return median(x, int(p.scale))[:, None]
    size = (b, p.copies, *shape)
    if p.family == "gaussian":
        return x[:, None] + torch.randn(size, generator=gen, device=x.device, dtype=x.dtype) * (p.scale * span)
    if p.family == "uniform":
        u = torch.rand(size, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1
        return x[:, None] + u * (p.scale * span)
    if p.family == "snr":
        rms = x.flatten(1).square().mean(1).sqrt().clamp_min(1e-6)
        sigma = (rms / 10 ** (p.scale / 20)).view(b, 1, *[1] * len(shape))
        return x[:, None] + torch.randn(size, generator=gen, device=x.device, dtype=x.dtype) * sigma
    if p.family == "gain":
        db = (torch.rand((b, p.copies, *[1] * len(shape)), generator=gen, device=x.device) * 2 - 1) * p.scale
        return x[:, None] * 10 ** (db / 20)
    # Shifts are drawn on the generator's own device (a CUDA generator cannot draw into a CPU tensor), one set
    # for the whole batch, then read back: torch.roll takes Python ints.
    if p.family == "sweep":
        shifts = sweep_shifts(float(torch.rand((), generator=gen, device=gen.device)), p).tolist()
    else:  # shift
        shifts = torch.randint(-int(p.scale), int(p.scale) + 1, (p.copies,), generator=gen, device=gen.device).tolist()
    return torch.stack([torch.roll(x, s, dims=-1) for s in shifts], 1)


def build_rows(
    x: torch.Tensor,
    perturbations: tuple[Perturbation, ...],
    gen: torch.Generator | None,
    value_range: tuple[float, float],
) -> torch.Tensor:
    """(B, *shape) -> (B, R, *shape): each input's original first, then its copies, clipped to the range."""
    lo, hi = value_range
    return torch.cat([x[:, None], *(perturb(x, p, gen, lo, hi) for p in perturbations)], 1).clamp_(lo, hi)
