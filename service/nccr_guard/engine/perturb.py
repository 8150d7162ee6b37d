"""Perturbation families. Noise families give `copies` random rows; squeezers give one deterministic row.

Every family works in the input's own value range `(lo, hi)`: a scale of 0.05 means 5 % of that range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import median_filter

RANDOM_FAMILIES = {"gaussian", "uniform", "snr", "shift", "gain"}
SQUEEZE_FAMILIES = {"bitdepth", "median"}


@dataclass(frozen=True)
class Perturbation:
    """One family at one strength.

    gaussian/uniform: additive noise, `scale` = std / half-width as a fraction of the value range.
    bitdepth: quantise to `scale` bits. median: median filter of size `scale` over the last two axes.
    snr: additive Gaussian noise at `scale` dB SNR relative to the clip's RMS (audio).
    shift: circular shift by up to `scale` samples along the last axis (audio).
    gain: gain drawn uniformly in ±`scale` dB (audio).
    """

    family: str
    scale: float
    copies: int = 1

    def __post_init__(self) -> None:
        if self.family not in RANDOM_FAMILIES | SQUEEZE_FAMILIES:
            raise ValueError(f"unknown perturbation family {self.family!r}")
        if self.family in SQUEEZE_FAMILIES and self.copies != 1:
            raise ValueError(f"{self.family} is deterministic: copies must be 1")
        if self.copies < 1:
            raise ValueError("copies must be >= 1")

    @property
    def key(self) -> str:
        return f"{self.family}:{self.scale:g}"

    def with_copies(self, copies: int) -> Perturbation:
        return self if self.family in SQUEEZE_FAMILIES else Perturbation(self.family, self.scale, copies)


def _noise(x: np.ndarray, p: Perturbation, rng: np.random.Generator, span: float) -> np.ndarray:
    shape = (p.copies, *x.shape)
    if p.family == "gaussian":
        return x + rng.standard_normal(shape, dtype=np.float32) * np.float32(p.scale * span)
    if p.family == "uniform":
        return x + rng.uniform(-p.scale * span, p.scale * span, shape).astype(np.float32)
    if p.family == "snr":
        rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) or 1e-6
        sigma = rms / (10.0 ** (p.scale / 20.0))
        return x + rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)
    if p.family == "gain":
        db = rng.uniform(-p.scale, p.scale, (p.copies,) + (1,) * x.ndim)
        return (x * (10.0 ** (db / 20.0))).astype(np.float32)
    shifts = rng.integers(-int(p.scale), int(p.scale) + 1, p.copies)  # shift
    return np.stack([np.roll(x, int(s), axis=-1) for s in shifts])


def _squeeze(x: np.ndarray, p: Perturbation, lo: float, hi: float) -> np.ndarray:
    if p.family == "bitdepth":
        levels = 2 ** int(p.scale) - 1
        unit = (x - lo) / (hi - lo)
        return (np.round(unit * levels) / levels * (hi - lo) + lo)[None].astype(np.float32)
    size = [1] * (x.ndim - 2) + [int(p.scale)] * min(2, x.ndim)
    return median_filter(x, size=size, mode="reflect")[None].astype(np.float32)


def perturb(
    x: np.ndarray, p: Perturbation, rng: np.random.Generator | None, value_range: tuple[float, float]
) -> np.ndarray:
    """(copies, *x.shape) perturbed copies of `x`, clipped to `value_range`."""
    lo, hi = value_range
    if p.family in SQUEEZE_FAMILIES:
        out = _squeeze(x, p, lo, hi)
    elif rng is None:
        raise ValueError(f"{p.key} draws random copies: it needs a generator")
    else:
        out = _noise(x, p, rng, hi - lo)
    return np.clip(out, lo, hi, out=out).astype(np.float32, copy=False)


def build_rows(
    x: np.ndarray,
    perturbations: tuple[Perturbation, ...],
    rng: np.random.Generator | None,
    value_range: tuple[float, float],
) -> np.ndarray:
    """(1 + sum(copies), *x.shape): the original first, then each family's copies in order."""
    x = np.asarray(x, dtype=np.float32)
    parts = [x[None]] + [perturb(x, p, rng, value_range) for p in perturbations]
    return np.concatenate(parts, axis=0)


def row_groups(perturbations: tuple[Perturbation, ...]) -> dict[str, slice]:
    """Which rows of `build_rows` belong to which perturbation (row 0 is the original)."""
    groups, start = {}, 1
    for p in perturbations:
        groups[p.key] = slice(start, start + p.copies)
        start += p.copies
    return groups
