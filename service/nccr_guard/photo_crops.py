"""The photo model's data: 32x32 colour crops of real photographs that scikit-image and scikit-learn ship,
labelled by the photo they come from, with train / calib / dev / test cut from disjoint regions of each photo.

A model.toml `[split]` with `source = "photo-crops"` describes it (models/photo/model.toml):
each photo is resized (Lanczos) so its shorter side is `short_side` pixels and cut into a grid of `block`-pixel
squares (the remainder at the right and bottom edge is unused). The blocks of photo i, shuffled by
`default_rng([seed, i])`, go to the splits named in `blocks` in name order (a share of the grid each, at least one
block) and the rest to train. A crop lies inside one block, at least `gap` pixels from its edges, so pixels of
two splits are at least 2 * gap apart, more than the resize filter's reach (3 output pixels for Lanczos): no
pixel of one split, nor any pixel of the original photo it was made from, is in another. `crops` says how many
crops each split takes per photo, at uniform positions; train crops are squares of side 32 * s for s uniform
in `train_scale`, resized to 32 (scale jitter), the others are 32 x 32 as cut. Splits are ordered by class.
"""

from __future__ import annotations

import functools
import json
import zlib

import numpy as np

SIDE = 32  # crop side the model takes


def _skimage(name: str):
    def load() -> np.ndarray:
        from skimage import data

        return data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()

    return load


def _sklearn(file: str):
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(file)

    return load


PHOTOS = {
    **{n: _skimage(n) for n in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "retina")},
    "hubble": _skimage("hubble_deep_field"),
    "ihc": _skimage("immunohistochemistry"),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
    **{n: _skimage(n) for n in ("brick", "grass", "gravel")},  # grey texture photographs, as RGB
}


@functools.cache
def photo(name: str, short_side: int) -> np.ndarray:
    """(H, W, 3) uint8: the named photo as RGB, resized so its shorter side is `short_side`."""
    from PIL import Image

    img = Image.fromarray(PHOTOS[name]()).convert("RGB")
    f = short_side / min(img.size)
    img = img.resize((round(img.width * f), round(img.height * f)), Image.Resampling.LANCZOS)
    out = np.asarray(img)
    out.setflags(write=False)
    return out


def block_splits(cfg: dict, index: int, shape: tuple[int, ...]) -> dict[str, list[tuple[int, int]]]:
    """split -> the (row, column) grid blocks of photo `index` (of `shape`) that it takes."""
    b = cfg["block"]
    grid = [(r, c) for r in range(shape[0] // b) for c in range(shape[1] // b)]
    order = np.random.default_rng([cfg["seed"], index]).permutation(len(grid))
    out, at = {}, 0
    for name in sorted(cfg["blocks"]):
        n = max(1, round(cfg["blocks"][name] * len(grid)))
        out[name], at = [grid[i] for i in order[at : at + n]], at + n
    out["train"] = [grid[i] for i in order[at:]]
    return out


def crop_boxes(cfg: dict, index: int, shape: tuple[int, ...], split: str) -> np.ndarray:
    """(n, 3) int: (top, left, side) of each crop that `split` takes from photo `index`, in resized pixels."""
    blocks = block_splits(cfg, index, shape)[split]
    b, gap, n = cfg["block"], cfg["gap"], cfg["crops"][split]
    rng = np.random.default_rng([cfg["seed"], index, zlib.crc32(split.encode())])
    lo, hi = cfg["train_scale"] if split == "train" else (1.0, 1.0)
    sides = np.minimum(np.round(SIDE * rng.uniform(lo, hi, n)).astype(int), b - 2 * gap)
    where = np.array(blocks)[rng.integers(0, len(blocks), n)]
    free = b - 2 * gap - sides  # room to move inside the block's interior
    top = where[:, 0] * b + gap + (rng.random(n) * (free + 1)).astype(int)
    left = where[:, 1] * b + gap + (rng.random(n) * (free + 1)).astype(int)
    return np.stack([top, left, sides], axis=1)


def crops(cfg: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, 32, 32) float32 in [0, 1] and (n,) int64 labels (photo index), ordered by photo.
    Built once per process and configuration."""
    return _crops(json.dumps(cfg, sort_keys=True), split)


@functools.cache
def _crops(key: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    cfg = json.loads(key)
    xs, ys = [], []
    for i, name in enumerate(cfg["photos"]):
        img = photo(name, cfg["short_side"])
        for top, left, side in crop_boxes(cfg, i, img.shape, split):
            patch = img[top : top + side, left : left + side]
            if side != SIDE:
                patch = np.asarray(Image.fromarray(patch).resize((SIDE, SIDE), Image.Resampling.BILINEAR))
            xs.append(patch)
            ys.append(i)
    # p / 255 in float32, as the upload decoder computes it (nccr_guard.inputs.decode_image)
    x = np.divide(np.stack(xs).transpose(0, 3, 1, 2), np.float32(255.0), dtype=np.float32)
    y = np.array(ys, np.int64)
    x.setflags(write=False)
    return x, y
