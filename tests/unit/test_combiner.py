"""The logistic combiner (engine/combiner.py): its fit, its artifact round trip, and where it may not go."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from nccr_guard.engine import Calibration, get_variant
from nccr_guard.engine.calibration import set_combiner
from nccr_guard.engine.combiner import Z_CLIP, fit_logistic, linear, spread, zscores
from nccr_guard.engine.score import combine, ood_spread
from nccr_guard.engine.variants import Schedule


def _groups(rng: np.random.Generator, n: int = 300, dims: int = 6) -> tuple[np.ndarray, list[np.ndarray]]:
    """Clean z-scores around 0; two attacks, each shifted along its own component."""
    neg = rng.standard_normal((n, dims))
    pos = []
    for k in (1, 4):
        p = rng.standard_normal((n // 10, dims))
        p[:, k] += 4.0
        pos.append(p)
    return neg, pos


def test_a_fitted_combiner_ranks_each_attack_above_clean_and_weights_its_components():
    rng = np.random.default_rng(0)
    neg, pos = _groups(rng)
    w, b = fit_logistic(neg, pos, c=100.0)
    assert w[1] > 0.5 and w[4] > 0.5  # the two informative components carry the weight
    assert np.abs(np.delete(w, [1, 4])).max() < 0.5 * min(w[1], w[4])
    clean = linear(neg, w, b)
    for p in pos:
        assert np.mean(linear(p, w, b)[:, None] > clean[None, :]) > 0.97


def test_each_attack_counts_alike_whatever_its_size():
    """A group of 5 examples pulls as hard as one of 300: no attack outweighs another by its count."""
    rng = np.random.default_rng(1)
    neg, (a, b_) = _groups(rng)
    w_small, _ = fit_logistic(neg, [a[:5], b_], c=100.0)
    w_big, _ = fit_logistic(neg, [np.repeat(a[:5], 60, axis=0), b_], c=100.0)
    np.testing.assert_allclose(w_small, w_big, rtol=1e-3, atol=1e-3)


def test_fit_refuses_missing_data():
    with pytest.raises(ValueError, match="clean and adversarial"):
        fit_logistic(np.zeros((0, 3)), [np.ones((4, 3))])
    with pytest.raises(ValueError, match="clean and adversarial"):
        fit_logistic(np.ones((4, 3)), [np.zeros((0, 3))])


def test_z_scores_are_clipped_so_one_component_cannot_run_away():
    raw = np.array([[1e-30, 1e30]])
    z = zscores(raw, np.zeros(2), np.full(2, 0.1))
    assert z.tolist() == [[-Z_CLIP, Z_CLIP]]
    assert spread(z)[0] == pytest.approx(Z_CLIP)
    assert zscores(raw, np.zeros(2), np.full(2, 0.1), clip=False)[0, 1] > 20 * Z_CLIP


def _calibration(n: int, rng: np.random.Generator) -> tuple[Calibration, np.ndarray]:
    raw_b = np.exp(rng.standard_normal((200, n)))
    calib = Calibration(
        variant="nccr-v4",
        thresholds={"logits": np.zeros(10, np.float32)},
        selection={"logits": np.zeros((10, 3), np.int64)},
        spread={"gaussian:0.1|logits": np.ones(10, np.float32)},
        comp_mu=np.zeros(n),
        comp_sigma=np.ones(n),
        threshold=np.inf,
        target_fpr=0.05,
        clean_scores=np.zeros(0),
        robustness=0.1,
    )
    return calib, raw_b


def test_the_weights_round_trip_through_the_calibration_file_and_score_alike(tmp_path):
    rng = np.random.default_rng(2)
    calib, raw_b = _calibration(5, rng)
    w = rng.standard_normal(5)
    set_combiner(calib, raw_b, w, -0.7)
    # the threshold and the p-values come from clean half B under the fitted combiner, at the target FPR
    assert np.mean(combine(raw_b, calib) > calib.threshold) <= 0.05
    assert 0 < np.mean(ood_spread(raw_b, calib) > calib.ood_threshold) <= 0.02  # its 99th percentile
    calib.save(tmp_path / "c.npz")
    back = Calibration.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(back.weights, calib.weights)
    assert (back.bias, back.threshold, back.ood_threshold) == (calib.bias, calib.threshold, calib.ood_threshold)
    x = np.exp(rng.standard_normal((7, 5)))
    np.testing.assert_array_equal(combine(x, back), linear(zscores(x, np.zeros(5), np.ones(5)), w, -0.7))


def test_a_max_calibration_keeps_the_max_and_has_no_weights(tmp_path):
    rng = np.random.default_rng(3)
    calib, raw_b = _calibration(4, rng)
    calib.save(tmp_path / "c.npz")
    back = Calibration.load(tmp_path / "c.npz")
    assert back.weights is None and back.bias == 0.0
    x = np.exp(rng.standard_normal((6, 4)))
    np.testing.assert_array_equal(combine(x, back), np.log(x + 1e-6).max(1))


def test_a_weighted_sum_is_never_tested_sequentially_nor_built_as_the_max_graph():
    from nccr_guard.backends.onnx_verdict import verdict_graph

    v4 = get_variant("nccr-v4")
    with pytest.raises(ValueError, match="weighted sum"):
        v4.with_schedule(Schedule())
    with pytest.raises(ValueError, match="sequential testing bounds a max"):
        replace(v4, sequential=Schedule())
    # a squeeze-only variant the graph expresses, once it carries fitted weights, is refused too
    v3 = get_variant("nccr-v3")
    rng = np.random.default_rng(4)
    calib, raw_b = _calibration(3, rng)
    calib.spread = {}
    assert verdict_graph(v3, calib, (0.0, 1.0), None, None, 10, dims=3) is not None
    set_combiner(calib, raw_b, np.ones(3), 0.0)
    assert verdict_graph(v3, calib, (0.0, 1.0), None, None, 10, dims=3) is None
