"""Benign distortions of clean uploads and out-of-distribution inputs, for false-alarm studies.

Uploads in production are re-encoded, resized, noisy and slightly misaligned; none of that makes them
adversarial. Each shift maps a batch (n, C, H, W) in [0, 1] to the same shape, deterministically given `rng`;
a spatial shift moves every channel of an image alike (grey digits have one channel, photo crops three).
The set is named in every report that uses it (SHIFTS' keys). `HELD_OUT_SHIFTS` are never used to fit anything
(the others are a set's `calibration` shifts, the ones a calibration may see), so a report shows whether the
threshold rule carries over to distortions it was not fitted on. `for_manifest` gives a model's set whatever
its modality (an audio model's lives in eval.audio_shifts), so the fits and studies that use shifts take images
and clips alike.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from nccr_guard.manifest import Manifest

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _per_image(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """`fn` maps one (H, W) plane; it is applied to every channel of every image."""

    def run(xs: np.ndarray) -> np.ndarray:
        return np.stack([np.stack([fn(c) for c in x]) for x in xs])

    return run


def rotate(deg: float) -> Shift:
    """Rotation by ±`deg` degrees (sign drawn per image), bilinear, same canvas."""

    def shift(xs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        signs = rng.choice([-1.0, 1.0], len(xs))
        return np.stack(
            [
                np.stack([ndimage.rotate(c, s * deg, reshape=False, order=1, mode="constant") for c in x])
                for x, s in zip(xs, signs, strict=True)
            ]
        )

    return shift


def translate(px: int) -> Shift:
    """A shift by `px` pixels in a direction drawn per image (up, down, left or right)."""

    def shift(xs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        steps = [(px, 0), (-px, 0), (0, px), (0, -px)]
        picks = rng.integers(0, 4, len(xs))
        return np.stack(
            [
                np.stack([ndimage.shift(c, steps[i], order=0, mode="constant") for c in x])
                for x, i in zip(xs, picks, strict=True)
            ]
        )

    return shift


def blur(sigma: float) -> Shift:
    return lambda xs, rng: _per_image(lambda a: ndimage.gaussian_filter(a, sigma))(xs)


def noise(sigma: float) -> Shift:
    return lambda xs, rng: xs + rng.standard_normal(xs.shape).astype(np.float32) * sigma


def down_up(factor: int) -> Shift:
    """Down-scale by `factor` and back (bilinear): a thumbnail blown up again."""

    def once(a: np.ndarray) -> np.ndarray:
        small = ndimage.zoom(a, 1 / factor, order=1)
        return ndimage.zoom(small, np.array(a.shape) / np.array(small.shape), order=1)

    return lambda xs, rng: _per_image(once)(xs)


def background(level: float) -> Shift:
    """A grey background: dark pixels lifted to `level`, strokes kept (x -> level + (1 - level) x)."""
    return lambda xs, rng: level + (1.0 - level) * xs


def contrast(gain: float) -> Shift:
    """Fainter strokes: x -> gain * x (a scan or photo with less contrast)."""
    return lambda xs, rng: gain * xs


def jpeg(quality: int) -> Shift:
    """A JPEG re-encode at `quality`, as many upload paths do."""
    from PIL import Image

    def once(x: np.ndarray) -> np.ndarray:
        """One (C, H, W) image: grey as "L", three channels as "RGB" (chroma subsampled, as a camera's JPEG)."""
        pixels = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
        img = Image.fromarray(pixels[0], "L") if len(x) == 1 else Image.fromarray(pixels.transpose(1, 2, 0), "RGB")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        out = np.asarray(Image.open(buf), np.float32) / 255.0
        return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)

    return lambda xs, rng: np.stack([once(x) for x in xs])


def zoom_out(scale: float) -> Shift:
    """The digit drawn smaller on the same canvas (scale < 1), centred."""

    def once(a: np.ndarray) -> np.ndarray:
        small = ndimage.zoom(a, scale, order=1)
        out = np.zeros_like(a)
        top, left = ((np.array(a.shape) - small.shape) // 2).tolist()
        out[top : top + small.shape[0], left : left + small.shape[1]] = small
        return out

    return lambda xs, rng: _per_image(once)(xs)


SHIFTS: dict[str, Shift] = {
    "rotate_10": rotate(10),
    "rotate_15": rotate(15),
    "blur_0.7": blur(0.7),
    "translate_2px": translate(2),
    "noise_0.1": noise(0.1),
    "down_up_2x": down_up(2),
    "grey_background_0.3": background(0.3),
    "jpeg_75": jpeg(75),
    "contrast_0.7": contrast(0.7),
    "zoom_out_0.8": zoom_out(0.8),
    "noise_0.05": noise(0.05),
}
HELD_OUT_SHIFTS = ("rotate_15", "zoom_out_0.8", "noise_0.05")


def apply(name: str, xs: np.ndarray, seed: int, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Shift `name` of a batch (n, C, H, W), clipped to the value range, float32."""
    out = SHIFTS[name](xs.astype(np.float32), np.random.default_rng(seed))
    return np.clip(out, *value_range).astype(np.float32)


def ood_inputs(n: int, shape: tuple[int, ...], seed: int) -> dict[str, np.ndarray]:
    """Inputs that are no digit or photo at all: blank, uniform grey, uniform noise, smooth noise blobs, and
    letters, each (n, *shape); blobs and letters are grey, their plane repeated on every channel."""
    rng = np.random.default_rng(seed)
    blobs = np.stack([ndimage.gaussian_filter(rng.random(shape[-2:]), 2.0)[None] for _ in range(n)])
    blobs = (blobs - blobs.min()) / (np.ptp(blobs) + 1e-9)
    channels = shape[0]
    return {
        "blank": np.zeros((n, *shape), np.float32),
        "grey": np.full((n, *shape), 0.5, np.float32),
        "uniform_noise": rng.random((n, *shape)).astype(np.float32),
        "blobs": np.repeat(blobs.astype(np.float32), channels, axis=1),
        "letters": np.repeat(letters(n, shape[-2:], rng), channels, axis=1),
    }


def letters(n: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(n, 1, H, W) capital letters in PIL's bundled font, light on dark as MNIST draws digits."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=int(size[0] * 0.8))
    out = []
    for _ in range(n):
        ch = "ABCDEFGHJKLMNPQRTUVWXYZ"[int(rng.integers(0, 23))]
        img = Image.new("L", size[::-1], 0)
        draw = ImageDraw.Draw(img)
        left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)
        draw.text(((size[1] - right - left) / 2, (size[0] - bottom - top) / 2), ch, fill=255, font=font)
        out.append(np.asarray(img, np.float32)[None] / 255.0)
    return np.stack(out).astype(np.float32)


@dataclass(frozen=True)
class ShiftSet:
    """One modality's benign shifts (`names`, of which `held_out` are never fitted on) and its inputs that are
    out of distribution. `apply(name, xs, seed)` shifts a batch of model inputs; `ood(n, shape, seed)` makes them."""

    names: tuple[str, ...]
    held_out: tuple[str, ...]
    apply: Callable[[str, np.ndarray, int], np.ndarray]
    ood: Callable[[int, tuple[int, ...], int], dict[str, np.ndarray]]

    @property
    def calibration(self) -> tuple[str, ...]:
        return tuple(k for k in self.names if k not in self.held_out)

    def shifted(self, xs: np.ndarray, seed: int, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Each named shift of `xs` (all of `names` by default), shift i of `names` drawn with seed `seed` + i: one
        seed per shift whatever subset is asked for, so a calibration's shifted inputs equal a study's."""
        return {s: self.apply(s, xs, seed + i) for i, s in enumerate(self.names) if names is None or s in names}


def for_manifest(manifest: Manifest) -> ShiftSet:
    """The shift set of a model: the image shifts above in its value range, or eval.audio_shifts' for audio."""
    if manifest.modality == "audio":
        from nccr_guard.eval.audio_shifts import shift_set

        return shift_set(manifest)
    vr = tuple(manifest.input.range)
    return ShiftSet(tuple(SHIFTS), HELD_OUT_SHIFTS, lambda name, xs, seed: apply(name, xs, seed, vr), ood_inputs)
