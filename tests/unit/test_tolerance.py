"""The cross-implementation tolerances of tests/tolerance.py can fail: they admit float32 noise of the size they
are derived from, and reject what a broken implementation gives (logits off by a little more, rows swapped, a
loose tolerance that decides no verdict)."""

from __future__ import annotations

import numpy as np
import pytest

from nccr_guard.detector import Detector
from tests.conftest import MNIST
from tests.tolerance import (
    Tolerance,
    assert_f32_close,
    assert_verdicts_close,
    f32_rtol,
    reduction_length,
    verdict_tolerance,
)

N_MNIST = reduction_length(MNIST / "model.onnx")


def test_reduction_length_sums_the_models_reductions():
    assert N_MNIST == 1 * 3 * 3 + 32 * 3 * 3 + 64 * 5 * 5 + 128


def test_f32_close_admits_the_bound_and_rejects_more():
    rng = np.random.default_rng(0)
    want = (rng.standard_normal((50, 10)) * 8).astype(np.float32)
    e = f32_rtol(N_MNIST) * np.abs(want).max(-1, keepdims=True)
    assert_f32_close(want + (0.99 * e * rng.uniform(-1, 1, want.shape)).astype(np.float32), want, N_MNIST)
    off = want.copy()
    off[7, 3] += 1.5 * e[7, 0]
    with pytest.raises(AssertionError, match="1 of 500 differ"):
        assert_f32_close(off, want, N_MNIST)


@pytest.fixture(scope="module")
def scored(mnist_test, mnist_v3):
    """The default detector's logits and verdicts of held-out digits and of sign-noised ones (both verdicts)."""
    from tests.unit.test_fused import inputs

    det = Detector.load(mnist_v3, backend="onnx", device="cpu", fuse=False)
    acts = det.activations(inputs(mnist_test))
    tol = verdict_tolerance(det.verdict_spec(classes=10), acts["logits"], N_MNIST)
    return det, acts, det.verdicts(acts), tol


def moved(det, acts, logits):
    return det.verdicts({**acts, "logits": logits.astype(np.float32)})


def test_verdicts_within_the_logits_tolerance_pass(scored):
    """Every logit moved by up to (just under) the tolerance the verdicts' is derived from: still the same."""
    det, acts, want, tol = scored
    lg = acts["logits"].astype(np.float64)
    e = f32_rtol(N_MNIST) * np.abs(lg).reshape(len(lg), -1).max(-1)[:, None, None]
    rng = np.random.default_rng(1)
    for _ in range(5):
        assert_verdicts_close(moved(det, acts, lg + 0.99 * e * rng.uniform(-1, 1, lg.shape)), want, tol, det.calib)
    assert 5 < sum(v.adversarial for v in want) < len(want) - 5


@pytest.mark.parametrize("how", ["logits x 30 tolerance", "rows swapped", "logits + 1e-3 L"])
def test_what_a_broken_implementation_gives_fails(scored, how):
    det, acts, want, tol = scored
    lg = acts["logits"].astype(np.float64)
    scale = np.abs(lg).reshape(len(lg), -1).max(-1)[:, None, None]
    rng = np.random.default_rng(2)
    if how == "rows swapped":  # the components read each other's squeezes
        bad = lg[:, [0, 2, 1, 3]]
    elif how == "logits + 1e-3 L":  # a forward off by 1e-3 of its scale (half-precision accumulation: 5e-4)
        bad = lg + 1e-3 * scale * rng.uniform(-1, 1, lg.shape)
    else:
        bad = lg + 30 * f32_rtol(N_MNIST) * scale * rng.uniform(-1, 1, lg.shape)
    with pytest.raises(AssertionError):
        assert_verdicts_close(moved(det, acts, bad), want, tol, det.calib)


def test_a_tolerance_that_decides_nothing_fails(scored):
    det, _, want, tol = scored
    loose = Tolerance(tol.raw, np.tile([-np.inf, np.inf], (len(want), 1)), tol.confidence, tol.prediction_fixed)
    with pytest.raises(AssertionError, match="score intervals hold the threshold"):
        assert_verdicts_close(want, want, loose, det.calib)
