"""Perturbation families. Noise families give `copies` random rows; squeezers give one deterministic row.

Every family works in the input's own value range `(lo, hi)`: a scale of 0.05 means 5 % of that range.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.ndimage import median_filter

RANDOM_FAMILIES = {"gaussian", "uniform", "snr", "shift", "sweep", "gain"}
SQUEEZE_FAMILIES = {"bitdepth", "median"}


@dataclass(frozen=True)
class Perturbation:
    """One family at one strength.

    gaussian/uniform: additive noise, `scale` = std / half-width as a fraction of the value range.
    bitdepth: quantise to `scale` bits. median: median filter of size `scale` over the last two axes.
    snr: additive Gaussian noise at `scale` dB SNR relative to the clip's RMS (audio).
    shift: circular shift by up to `scale` samples along the last axis (audio), each copy's shift drawn alone.
    sweep: the same shifts spread evenly over ±`scale` from one random start (a randomly rotated van der Corput
        sequence), so every prefix of the copies covers the range: 2 copies are half the range apart, 4 a
        quarter. Why: a clip's margin drop swings with the shift's phase within the spectrogram's hop, and
        independent shifts can land on near-identical phases; evenly spread ones make a mean over few copies
        close to the mean over many (the first rounds of sequential testing, docs/nccr.md).
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

    @cached_property  # asked per batch on the serving path; the perturbation is frozen
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
    # gain, sweep, shift: a number per copy (LazyRows builds single copies from the same numbers)
    return np.stack([_from_params(x, p, v) for v in _draw_params(p, rng)])


def sweep_shifts(start: float, p: Perturbation) -> np.ndarray:
    """The `sweep` family's shifts in samples: the van der Corput points rotated by `start` in [0, 1), spread
    over [-scale, scale]."""
    u = (start + van_der_corput(p.copies)) % 1.0
    return np.round((2.0 * u - 1.0) * p.scale).astype(np.int64)


def van_der_corput(n: int) -> np.ndarray:
    """The first n points of the base-2 van der Corput sequence (0, 1/2, 1/4, 3/4, 1/8, ...): bit-reversed
    indices, so each prefix of length 2^m holds one point in each of 2^m equal cells of [0, 1)."""
    out = np.zeros(n)
    for i in range(n):
        f, j = 0.5, i
        while j:
            out[i] += f * (j & 1)
            j >>= 1
            f /= 2
    return out


def _squeeze(xs: np.ndarray, p: Perturbation, lo: float, hi: float) -> np.ndarray:
    """The squeezed batch (B, *shape): squeezers are deterministic and per-sample, so one call does every input."""
    if p.family == "bitdepth":
        levels = 2 ** int(p.scale) - 1
        if lo == 0.0 and hi == 1.0:  # images: the maps to and from [0, 1] are exact identities (profiled: 3 of
            out = xs * np.float32(levels)  # the 4 rows of an nccr-v3 verdict are squeezes)
            np.round(out, out=out)
            out /= np.float32(levels)
            return out
        unit = (xs - lo) / (hi - lo)
        return (np.round(unit * levels) / levels * (hi - lo) + lo).astype(np.float32)
    nd = xs.ndim - 1  # one input's dimensions; the filter covers its last two (one for a 1-D signal)
    size = [1] * (xs.ndim - min(2, nd)) + [int(p.scale)] * min(2, nd)
    return median_filter(xs, size=size, mode="reflect").astype(np.float32)


def perturb_batch(
    xs: np.ndarray,
    p: Perturbation,
    rngs: list[np.random.Generator] | None,
    value_range: tuple[float, float],
) -> np.ndarray:
    """(B, copies, *shape) perturbed copies of each input in `xs` (B, *shape), clipped to `value_range`; each
    input's random copies come from its own generator in `rngs`."""
    lo, hi = value_range
    if p.family in SQUEEZE_FAMILIES:
        out = _squeeze(xs, p, lo, hi)[:, None]
    elif rngs is None:
        raise ValueError(f"{p.key} draws random copies: it needs a generator")
    else:
        out = np.stack([_noise(x, p, rng, hi - lo) for x, rng in zip(xs, rngs, strict=True)])
    return np.clip(out, lo, hi, out=out).astype(np.float32, copy=False)


def perturb(
    x: np.ndarray, p: Perturbation, rng: np.random.Generator | None, value_range: tuple[float, float]
) -> np.ndarray:
    """(copies, *x.shape) perturbed copies of one input `x`."""
    return perturb_batch(np.asarray(x, np.float32)[None], p, None if rng is None else [rng], value_range)[0]


def build_batch(
    xs: np.ndarray,
    perturbations: tuple[Perturbation, ...],
    rngs: list[np.random.Generator] | None,
    value_range: tuple[float, float],
) -> np.ndarray:
    """(B, 1 + sum(copies), *shape) rows of every input: the original first, then each family's copies in
    order. Built family by family over the whole batch (squeezers in one call each); random copies are drawn
    input by input from that input's generator, so an input's rows do not depend on its batch-mates."""
    xs = np.asarray(xs, dtype=np.float32)
    parts = [xs[:, None]] + [perturb_batch(xs, p, rngs, value_range) for p in perturbations]
    return np.concatenate(parts, axis=1)


def build_rows(
    x: np.ndarray,
    perturbations: tuple[Perturbation, ...],
    rng: np.random.Generator | None,
    value_range: tuple[float, float],
) -> np.ndarray:
    """(1 + sum(copies), *x.shape) rows of one input (see `build_batch`)."""
    return build_batch(np.asarray(x, np.float32)[None], perturbations, None if rng is None else [rng], value_range)[0]


def row_groups(perturbations: tuple[Perturbation, ...]) -> dict[str, slice]:
    """Which rows of `build_rows` belong to which perturbation (row 0 is the original)."""
    groups, start = {}, 1
    for p in perturbations:
        groups[p.key] = slice(start, start + p.copies)
        start += p.copies
    return groups


# Families that draw a number per value of a copy, made a few copies at a time: numpy fills element by element
# from the bit generator's stream (whose buffered half-word is part of its state), so the numbers are those of
# one draw of all copies. The families that draw a number per copy (gain, sweep, shift) draw them all at once,
# which costs nothing, and build only the rows asked for from them.
CHUNKED_DRAWS = {"gaussian", "snr", "uniform"}


class LazyRows:
    """One input's fixed-K rows (exactly `build_rows`'s, same generator, same order of draws), built as rounds
    of sequential testing ask for them. Why: a clip's verdict usually settles after ~5 of its 18 rows, yet the
    fixed-K rows cost ~3.5 ms for a 3 s clip (0.6 ms for the first round's), drawn on the event loop when the
    job started.

    A noise family's copies come from the generator after every earlier family's draws, so asking for a later
    family draws the earlier ones in full first; the dear part, a row per copy of the input's size, is made only
    for copies asked for where the draws allow (`CHUNKED_DRAWS`; sweep, shift and gain draw one number or a few
    per copy up front and build rows from them lazily). The generator is made at the first draw, off the event
    loop: `make_rng` (crc32 of a clip) is not free either."""

    def __init__(self, x, perturbations: tuple[Perturbation, ...], make_rng, value_range: tuple[float, float]):
        self.x = np.asarray(x, np.float32)
        self.perturbations, self.make_rng, self.range = perturbations, make_rng, value_range
        self.starts = np.cumsum([1] + [p.copies for p in perturbations])[:-1]
        self.n = 1 + sum(p.copies for p in perturbations)
        self._rows = np.empty((self.n, *self.x.shape), np.float32)
        self._made = np.zeros(self.n, bool)
        self._rows[0], self._made[0] = self.x, True
        self._rng: np.random.Generator | None = None
        self._drawn = [0] * len(perturbations)  # copies whose draws are made, per family
        self._params: list[np.ndarray | None] = [None] * len(perturbations)  # sweep / shift / gain draws

    def __len__(self) -> int:
        return self.n

    def take(self, idx: np.ndarray) -> np.ndarray:
        """The rows at `idx` (indices into the fixed-K rows), built first where they are not yet."""
        need = idx[~self._made[idx]]
        if len(need):
            fam = np.searchsorted(self.starts, need, side="right") - 1
            for f in np.unique(fam):
                self._build(int(f), int(need[fam == f].max() - self.starts[f]) + 1, need[fam == f])
        return self._rows[idx]

    def _build(self, f: int, upto: int, rows: np.ndarray) -> None:
        """Make rows `rows` of family `f`, whose copies up to `upto` must then be drawn."""
        p, lo, hi = self.perturbations[f], *self.range
        if p.family in SQUEEZE_FAMILIES:
            self._rows[rows] = perturb(self.x, p, None, self.range)
        else:
            for g in range(f):  # the generator must first pass every earlier family's draws
                if self.perturbations[g].family in RANDOM_FAMILIES and self._drawn[g] < self.perturbations[g].copies:
                    self._build(g, self.perturbations[g].copies, np.array([], int))
            have = self._drawn[f]
            if p.family in CHUNKED_DRAWS:
                upto = max(upto, have)
                if upto > have:
                    chunk = _noise(self.x, p.with_copies(upto - have), self._generator(), hi - lo)
                    at = self.starts[f] + have
                    self._rows[at : at + upto - have] = np.clip(chunk, lo, hi)
                    self._made[at : at + upto - have] = True
                    self._drawn[f] = upto
                return
            if self._params[f] is None:
                self._params[f] = _draw_params(p, self._generator())
                self._drawn[f] = p.copies
            for r in rows:
                self._rows[r] = np.clip(_from_params(self.x, p, self._params[f][r - self.starts[f]]), lo, hi)
        self._made[rows] = True

    def _generator(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = self.make_rng()
        return self._rng


def _draw_params(p: Perturbation, rng: np.random.Generator) -> np.ndarray:
    """The numbers a family whose copies are a number each draws: gain factors (from dB), sweep or shift
    offsets in samples. One place for `_noise` (every copy) and `LazyRows` (the copies asked for)."""
    if p.family == "gain":
        return 10.0 ** (rng.uniform(-p.scale, p.scale, p.copies) / 20.0)
    if p.family == "sweep":
        return sweep_shifts(rng.random(), p)
    return rng.integers(-int(p.scale), int(p.scale) + 1, p.copies)  # shift


def _from_params(x: np.ndarray, p: Perturbation, v) -> np.ndarray:
    """One copy of a family whose copies are a number each, from its number (`_draw_params`)."""
    if p.family == "gain":
        return (x * v).astype(np.float32)
    return np.roll(x, int(v), axis=-1)
