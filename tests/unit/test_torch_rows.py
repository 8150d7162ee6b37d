"""The GPU row builder (torch) against the engine's numpy perturbations, run on the CPU."""

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
def test_squeezers_match_numpy_exactly(p):
    x = np.random.default_rng(0).random((4, 3, 9, 11)).astype(np.float32)
    want = np.stack([perturb(xi, p, np.random.default_rng(0), (0.0, 1.0))[0] for xi in x])
    got = build_rows(torch.from_numpy(x), (p,), torch.Generator().manual_seed(0), (0.0, 1.0))[:, 1].numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_noise_rows_have_the_right_shape_scale_and_range():
    x = torch.full((2, 1, 28, 28), 0.5)
    ps = (Perturbation("gaussian", 0.05, 16), Perturbation("uniform", 0.1, 8), Perturbation("bitdepth", 1))
    rows = build_rows(x, ps, torch.Generator().manual_seed(1), (0.0, 1.0))
    assert rows.shape == (2, 1 + 16 + 8 + 1, 1, 28, 28)
    assert torch.equal(rows[:, 0], x)
    assert abs(float((rows[:, 1:17] - 0.5).std()) - 0.05) < 0.005
    assert float((rows[:, 17:25] - 0.5).abs().max()) <= 0.1 + 1e-6
    assert rows.min() >= 0 and rows.max() <= 1
    ref = np_build_rows(x[0].numpy(), ps, np.random.default_rng(0), (0.0, 1.0))
    assert ref.shape == rows.shape[1:]


def test_device_rows_path_gives_the_same_verdicts_as_the_numpy_path(detector, mnist_test):
    """The CUDA code path (rows built in torch), exercised on the CPU."""
    from nccr_guard.detector import Detector

    xs = list(mnist_test[0][:60])
    ref = detector.detect(xs)
    det = Detector.load(detector.manifest.root, backend="torch", device="cpu")
    det.backend.device_rows = True
    got = det.detect(xs)
    a, b = np.array([v.score for v in ref]), np.array([v.score for v in got])
    assert [v.index for v in ref] == [v.index for v in got]
    assert np.corrcoef(a, b)[0, 1] > 0.9
    assert np.mean([u.verdict == v.verdict for u, v in zip(ref, got, strict=True)]) >= 0.9


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
