"""The photo model's pieces: disjoint crop splits, the colour augmentation, the network, centre-cropped uploads."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from nccr_guard.datasets import load_split, split_size
from nccr_guard.inputs import decode
from nccr_guard.manifest import ManifestError, load_manifest
from nccr_guard.photo_crops import block_splits, crop_boxes, photo
from tests.conftest import ROOT

PHOTO = ROOT / "models" / "photo"
SPLITS = ("train", "calib", "dev", "test")


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(PHOTO)


def covered(cfg: dict, index: int, shape: tuple[int, ...], split: str, grow: int = 0) -> np.ndarray:
    """(H, W) bool: the pixels of photo `index` that `split`'s crops cover, each box grown by `grow` pixels."""
    mask = np.zeros(shape[:2], bool)
    for top, left, side in crop_boxes(cfg, index, shape, split):
        mask[max(0, top - grow) : top + side + grow, max(0, left - grow) : left + side + grow] = True
    return mask


def test_no_pixel_of_one_split_is_near_another(manifest):
    """Per photo, the crops of each split keep at least 2 * gap pixels (in the resized photo) from every other
    split's crops, and each split's blocks are its own: no calib, dev or test pixel was seen in training."""
    cfg = manifest.split
    for i, name in enumerate(cfg["photos"]):
        shape = photo(name, cfg["short_side"]).shape
        blocks = block_splits(cfg, i, shape)
        assert sum(len(b) for b in blocks.values()) == len({b for bs in blocks.values() for b in bs})
        assert all(blocks[s] for s in SPLITS), name
        masks = {s: covered(cfg, i, shape, s) for s in SPLITS}
        for s in SPLITS[1:]:
            near = covered(cfg, i, shape, s, grow=2 * cfg["gap"] - 1)
            assert not (near & masks["train"]).any(), (name, s)
            assert all(not (near & masks[o]).any() for o in SPLITS[1:] if o != s), (name, s)


def test_splits_are_balanced_ordered_and_repeatable(manifest):
    for s in SPLITS:
        x, y = load_split(manifest, s)
        per = manifest.split["crops"][s]
        assert x.shape == (per * 13, 3, 32, 32) and x.dtype == np.float32 and len(x) == split_size(manifest, s)
        assert (np.bincount(y) == per).all() and (np.diff(y) >= 0).all()
        assert x.min() >= 0 and x.max() <= 1
    a, b = load_split(manifest, "test", limit=26)[1], load_split(manifest, "test", limit=26)[1]
    assert (a == b).all() and (np.bincount(a) == 2).all()
    with pytest.raises(ManifestError, match="no split 'holdout'"):
        split_size(manifest, "holdout")


def test_test_crops_are_the_photo_pixels_as_an_upload_decodes_them(manifest):
    """A test crop is its box of the resized photo over 255, as a PNG of that box decodes (no rescaling)."""
    from PIL import Image

    cfg = manifest.split
    img = photo("chelsea", cfg["short_side"])
    top, left, side = crop_boxes(cfg, 1, img.shape, "test")[0]
    buf = io.BytesIO()
    Image.fromarray(img[top : top + side, left : left + side]).save(buf, "PNG")
    x, _ = load_split(manifest, "test", index=np.array([40]))
    assert np.array_equal(decode(buf.getvalue(), manifest), x[0])


def test_uploads_of_another_shape_are_centre_cropped(manifest):
    """fit = "crop": a 64 x 40 (W x H) upload keeps its centre 40 x 40, then is resized to 32 x 32."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)
    pixels[:, :12] = pixels[:, -12:] = 0  # the strips a centre crop drops
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    got = decode(buf.getvalue(), manifest)
    want = np.asarray(Image.fromarray(pixels[:, 12:52]).resize((32, 32), Image.Resampling.BILINEAR, reducing_gap=3.0))
    assert got.shape == (3, 32, 32)
    assert np.array_equal(got, np.divide(want.transpose(2, 0, 1), np.float32(255), dtype=np.float32))


def test_colour_augment_keeps_range_and_is_seeded():
    from nccr_guard.training import colour_augment

    x = torch.rand(8, 3, 32, 32)
    a = colour_augment(x, torch.Generator().manual_seed(1))
    b = colour_augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x)


def test_photo_resnet_shape_and_size():
    from nccr_guard.nets import BasicBlock, PhotoResNet

    net = PhotoResNet(13).eval()
    assert 100_000 < sum(p.numel() for p in net.parameters()) < 300_000
    assert sum(isinstance(m, BasicBlock) for m in net.modules()) == 6
    feats = []
    net.fc1.register_forward_hook(lambda module, args, out: feats.append(out))
    with torch.inference_mode():
        assert net(torch.rand(2, 3, 32, 32)).shape == (2, 13)
    assert feats[0].shape == (2, 128) and (feats[0] >= 0).all()  # the watched layer: post-ReLU features
