"""The GPU row builder (torch) against the engine's numpy perturbations, run on the CPU.

The squeezers are exact by construction (tests/tolerance.py): a bit-depth squeeze is the same correctly rounded
float32 steps in the same order in both libraries, a median filter a selection, so they are compared bit for bit;
noise families draw from another generator and are compared by their statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nccr_guard.backends.torch_rows import build_rows
from nccr_guard.engine import Perturbation
from nccr_guard.engine import build_rows as np_build_rows
from nccr_guard.engine.perturb import perturb


@pytest.mark.parametrize(
    "p",
    [Perturbation("bitdepth", 1), Perturbation("bitdepth", 3), Perturbation("median", 2), Perturbation("median", 3)],
)
@pytest.mark.parametrize("value_range", [(0.0, 1.0), (-1.0, 1.0), (-0.3, 2.9)])
def test_squeezers_match_numpy_exactly(p, value_range):
    lo, hi = value_range
    x = (lo + (hi - lo) * np.random.default_rng(0).random((4, 3, 9, 11))).astype(np.float32)
    x[0, 0, 0] = hi  # the ends of the range, where the clip is read
    x[0, 0, 1] = lo
    want = np.stack([perturb(xi, p, np.random.default_rng(0), value_range)[0] for xi in x])
    got = build_rows(torch.from_numpy(x), (p,), torch.Generator().manual_seed(0), value_range)[:, 1].numpy()
    np.testing.assert_array_equal(got, want)


def test_noise_rows_have_the_right_shape_scale_and_range():
    x = torch.full((2, 1, 28, 28), 0.5)
    ps = (Perturbation("gaussian", 0.05, 16), Perturbation("uniform", 0.1, 8), Perturbation("bitdepth", 1))
    rows = build_rows(x, ps, torch.Generator().manual_seed(1), (0.0, 1.0))
    assert rows.shape == (2, 1 + 16 + 8 + 1, 1, 28, 28)
    assert torch.equal(rows[:, 0], x)  # the original, copied: exact
    assert abs(float((rows[:, 1:17] - 0.5).std()) - 0.05) < 0.005
    assert float((rows[:, 17:25] - 0.5).abs().max()) <= 0.1 + 1e-6
    assert rows.min() >= 0 and rows.max() <= 1
    ref = np_build_rows(x[0].numpy(), ps, np.random.default_rng(0), (0.0, 1.0))
    assert ref.shape == rows.shape[1:]


def test_device_rows_path_gives_the_same_verdicts_as_the_numpy_path(detector_v3, mnist_test):
    """The CUDA code path (rows built in torch), exercised on the CPU. MNIST as nccr-v3 has no noise copies,
    so its rows are the numpy path's bit for bit (above) and the verdicts differ only by the forward (across
    kernels: rows normalised on the device, forwarded as another tensor): within the float32 tolerance of the
    model's reductions, verdicts exactly away from the threshold."""
    from nccr_guard.detector import Detector
    from tests.conftest import MNIST
    from tests.tolerance import assert_verdicts_close, reduction_length, verdict_tolerance

    xs = mnist_test[0][:60]
    ref = detector_v3.detect(xs)
    det = Detector.load(detector_v3.manifest.root, backend="torch", device="cpu")
    det.backend.device_rows = True
    got = det.detect(xs)
    logits = detector_v3.activations(xs)["logits"]
    tol = verdict_tolerance(detector_v3.verdict_spec(classes=10), logits, reduction_length(MNIST / "model.onnx"))
    assert_verdicts_close(got, ref, tol, detector_v3.calib)


@pytest.mark.parametrize("family", ["shift", "sweep"])
def test_shift_rows_are_circular_shifts_within_the_scale(family):
    """The audio shift families on the device path: every copy is the clip rolled by at most `scale` samples
    (drawn on the generator's device), and `sweep` puts its two copies in opposite halves of the range."""
    x = torch.zeros(3, 4000)
    x[:, 0] = 1.0
    rows = build_rows(x, (Perturbation(family, 400, 2),), torch.Generator().manual_seed(3), (-1.0, 1.0))
    pos = rows[:, 1:].argmax(-1)
    s = torch.where(pos > 2000, pos - 4000, pos)
    assert rows.shape == (3, 3, 4000) and int(s.abs().max()) <= 400
    assert torch.equal(torch.roll(x[0], int(s[0, 0]), -1), rows[0, 1])
    if family == "sweep":
        assert int(s[0, 0].sign() * s[0, 1].sign()) <= 0 and abs(int(s[0, 0] - s[0, 1])) >= 399
