"""Benign shifts (eval/shifts.py) on grey digits and on colour photo crops: a spatial shift moves every channel
of an image alike, so a grey image repeated on three channels shifts to the grey result on each channel."""

from __future__ import annotations

import numpy as np
import pytest

from nccr_guard.eval import shifts
from tests.conftest import MNIST


@pytest.mark.parametrize("name", [k for k in shifts.SHIFTS if k != "jpeg_75" and not k.startswith("noise")])
def test_a_colour_image_of_grey_planes_shifts_as_its_grey_plane(name):
    grey = np.random.default_rng(0).random((4, 1, 32, 32)).astype(np.float32)
    colour = np.repeat(grey, 3, axis=1)
    want, got = shifts.apply(name, grey, seed=5), shifts.apply(name, colour, seed=5)
    assert got.shape == colour.shape and got.dtype == np.float32
    for c in range(3):
        np.testing.assert_array_equal(got[:, c], want[:, 0])
    if name not in ("contrast_0.7", "grey_background_0.3"):  # the two tone maps move every pixel by a formula
        assert not np.array_equal(got, colour)


def test_noise_is_drawn_per_channel_as_a_sensors_is():
    colour = np.full((2, 3, 16, 16), 0.5, np.float32)
    y = shifts.apply("noise_0.1", colour, seed=0)
    assert y.shape == colour.shape and not np.array_equal(y[:, 0], y[:, 1])
    assert 0.08 < float((y - colour).std()) < 0.12


def test_jpeg_keeps_colour_and_the_image():
    """A colour crop re-encodes as RGB (not one grey plane): channels stay apart, and close to the original."""
    rng = np.random.default_rng(1)
    x = np.zeros((2, 3, 32, 32), np.float32)
    x[:, 0] = 0.9  # red
    x[:, 2] = rng.random((2, 32, 32)) * 0.2
    y = shifts.apply("jpeg_75", x, seed=0)
    assert y.shape == x.shape
    assert y[:, 0].mean() > 0.8 and y[:, 1].mean() < 0.15
    assert np.abs(y - x).mean() < 0.05 and not np.array_equal(y, x)


def test_out_of_distribution_inputs_have_the_models_shape():
    for shape in [(1, 28, 28), (3, 32, 32)]:
        ood = shifts.ood_inputs(4, shape, seed=0)
        assert set(ood) == {"blank", "grey", "uniform_noise", "blobs", "letters"}
        assert all(v.shape == (4, *shape) and v.dtype == np.float32 for v in ood.values())
        assert ood["letters"].max() == pytest.approx(1.0) and ood["blank"].max() == 0.0


def test_a_subset_of_shifts_draws_what_the_whole_set_draws():
    """A calibration's shifted negatives (the set's calibration shifts) equal the same shifts of a study over every
    shift."""
    from nccr_guard.manifest import load_manifest

    ss = shifts.for_manifest(load_manifest(MNIST))
    x = np.random.default_rng(2).random((3, 1, 28, 28)).astype(np.float32)
    every = ss.shifted(x, 100)
    some = ss.shifted(x, 100, ss.calibration)
    assert ss.calibration == tuple(k for k in shifts.SHIFTS if k not in shifts.HELD_OUT_SHIFTS)
    assert list(every) == list(shifts.SHIFTS) and list(some) == list(ss.calibration)
    for name, xs in some.items():
        np.testing.assert_array_equal(xs, every[name])
    np.testing.assert_array_equal(every["noise_0.1"], shifts.apply("noise_0.1", x, 100 + 4))
