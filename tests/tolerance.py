"""How close two implementations of the same float computation must agree, for the tests that compare them.

Every comparison of two implementations in these tests is one of two kinds, and says which:

- **exact by construction**: the same library and kernel on the same data, or arithmetic whose every step is
  correctly rounded and done in a fixed order (IEEE + - * /, round, min / max, a selection such as a median or
  TopK, integers, a sum written out in numpy's order). Any processor gives the same bits, so the test compares
  bit for bit (`assert_array_equal`, `==`).
- **across libraries or kernels**: torch against numpy, torch's CPU kernels (MKL, oneDNN) against ONNX Runtime's
  (MLAS), or one library whose kernel it picks by instruction set (ATEN_CPU_CAPABILITY, AVX-512 / AMX) or by the
  rows per forward. A float32 sum of n terms may then be accumulated in another order or blocking, with or without
  fused multiply-adds. Each order's error is within lambda * sqrt(n) * u * sum|terms|, u = 2^-24, but with
  probability 1 - 2n exp(-lambda^2 / 2) (Higham & Mary, "A new approach to probabilistic rounding error
  analysis", SIAM J. Sci. Comput. 41, 2019; the worst case, n u sum|terms|, is reached only by adversarial
  rounding and propagated through the score's log(c + 1e-6) it would leave nothing to test). Through a network
  the layers' errors add up, so two forwards' logits differ by at most e = 2 * lambda * sqrt(N) * u * L, with N
  the reduction lengths of the network's layers summed (`reduction_length`), L the input's largest |logit|
  standing in for sum|terms|, the 2 for two implementations, and lambda = 8 (each logit's bound fails with
  probability below 1e-10). The verdict's components, score and p-value get their tolerances from that one by
  propagating it through the engine's formulas (`verdict_tolerance`), and verdicts are compared exactly except
  where the threshold lies within the score's tolerance interval (where either answer is right).

Measured on this project's CPUs: torch against ONNX Runtime on 300 MNIST digits differ by at most 10 u L (the
bound, 720 u L for the MNIST CNN, has a factor 70 to spare for other processors), while the mutations a test is
there to catch (a wrong row, a missing clamp, another EPS, unstandardised components) move components by 1e-2 or
more.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

U32 = 2.0**-24  # float32 unit roundoff
LAMBDA = 8.0  # Higham & Mary's lambda: a bound of lambda * sqrt(n) * u fails with probability 2n exp(-lambda^2 / 2)
F64 = 1e-12  # float64 log / exp / softmax in two libraries (a few ulps of O(1) values: ~1e-15), generously


def reduction_length(onnx_path: str | Path) -> int:
    """N: the reduction lengths of a model's Conv, Gemm and MatMul nodes summed (for the MNIST CNN
    9 + 288 + 1600 + 128 = 2025). Read from the ONNX graph, which every bundled model has."""
    import onnx

    model = onnx.load(str(onnx_path))
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        w = dims.get(node.input[1]) if len(node.input) > 1 else None
        if w is None:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type == "Conv":
            total += int(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            total += w[1] if attrs.get("transB", 0) else w[0]
        elif node.op_type == "MatMul":
            total += w[-2]
    if total == 0:
        raise ValueError(f"{onnx_path}: no Conv / Gemm / MatMul with weights")
    return total


def f32_rtol(n_reduce: int) -> float:
    """2 * lambda * sqrt(n) * u: how far, relative to sum|terms| (taken as the largest |value| near it), two
    implementations' float32 results through reductions of `n_reduce` terms in all may lie apart."""
    return 2 * LAMBDA * np.sqrt(n_reduce) * U32


def f32_atol(want: np.ndarray, n_reduce: int, axis: int | tuple[int, ...] = -1) -> np.ndarray:
    """`f32_rtol` times the largest |value| along `axis` (a row's logits, a layer's channels), broadcastable
    against `want`."""
    scale = np.abs(np.asarray(want, np.float64)).max(axis=axis, keepdims=True)
    return f32_rtol(n_reduce) * scale


def assert_f32_close(got, want, n_reduce: int, axis: int | tuple[int, ...] = -1, err_msg: str = "") -> None:
    """Two implementations' float32 outputs within `f32_atol` (shapes equal; NaN where the other has NaN)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    tol = np.broadcast_to(f32_atol(np.nan_to_num(want), n_reduce, axis), want.shape)
    bad = ~((np.abs(got.astype(np.float64) - want) <= tol) | (np.isnan(got) & np.isnan(want)))
    assert not bad.any(), (
        f"{err_msg} {bad.sum()} of {bad.size} differ beyond {f32_rtol(n_reduce):.3g} * max|want|: first at "
        f"{np.argwhere(bad)[0].tolist()}: {got[bad][0]!r} vs {want[bad][0]!r} (tolerance {tol[bad][0]:.3g})"
    )


@dataclass
class Tolerance:
    """Per input: how far another implementation's verdict may lie from the reference's."""

    raw: np.ndarray  # (B, components) absolute, on the raw component values
    score: np.ndarray  # (B, 2) the interval the combined standardised score may lie in
    confidence: np.ndarray  # (B,) absolute
    prediction_fixed: np.ndarray  # (B,) bool: the top class cannot change within the logits' tolerance

    def __getitem__(self, which) -> Tolerance:
        """The tolerances of some of the inputs (a slice or index array), for verdicts of a part of the batch."""
        return Tolerance(self.raw[which], self.score[which], self.confidence[which], self.prediction_fixed[which])


def verdict_tolerance(spec, logits: np.ndarray, n_reduce: int) -> Tolerance:
    """The tolerance of an nccr-v3 kind verdict (a `VerdictGraph` spec: margin drop / change components of one
    row each, and the `change` measure over the logits) computed from logits (B, R, C) by another implementation
    than the reference's, whose logits `logits` are.

    With every logit within e = f32_rtol(N) * L of the reference's: a margin (top minus best other) moves by at
    most 2e; a relative move c = delta / d (delta = m0 - m_r, clamped at 0 or absolute: |d delta| <= 4e;
    d = max(|m0|, EPS): |d d| <= 2e) by at most (4e + 2 c e) / (d - 2e); a `change` component (the mean of
    |l_r - l_0| / spread) by 2e times the mean of 1 / spread. Plus the float32 rounding of those few operations
    (8 u c; a mean of C terms summed in another order: 2 C u c). Each z-score (log(c + EPS) - mu) / sigma then
    lies between its values at c -/+ dc, and the score, the largest z, between the largest lower and the largest
    upper end; the confidence (a softmax probability: its gradient's absolute values sum to 2 p (1 - p) <= 1/2)
    moves by at most e / 2."""
    from nccr_guard.engine.score import EPS

    lg = np.asarray(logits, np.float64)
    b, r, c = lg.shape
    e = f32_rtol(n_reduce) * np.abs(lg).reshape(b, -1).max(-1)  # (B,) each input's logit tolerance
    l0 = lg[:, 0]
    pred = l0.argmax(-1)
    at = np.broadcast_to(pred[:, None, None], (b, r, 1))
    others = lg.copy()
    np.put_along_axis(others, at, -np.inf, 2)
    m = np.take_along_axis(lg, at, 2)[..., 0] - others.max(-1)  # (B, R)
    d = np.maximum(np.abs(m[:, 0]), EPS)
    spreads = iter(spec.spread if spec.spread is not None else ())
    raw, z_lo, z_hi = [], [], []
    for i, (measure, col) in enumerate(zip(spec.measures, spec.cols, strict=True)):
        if measure == "change":
            s = np.asarray(next(spreads), np.float64)
            value = (np.abs(lg[:, col] - l0) / s).mean(-1)
            tol = 2 * e * (1 / s).mean() + 2 * c * U32 * value
        else:
            delta = m[:, 0] - m[:, col]
            value = (np.maximum(delta, 0) if measure == "margin" else np.abs(delta)) / d
            with np.errstate(divide="ignore"):
                tol = np.where(d > 2 * e, (4 * e + 2 * value * e) / (d - 2 * e), np.inf) + 8 * U32 * value
        raw.append(tol)
        with np.errstate(divide="ignore", invalid="ignore"):
            low = np.log(np.maximum(value - tol, 0) + EPS)
        z_lo.append((low - spec.mu[i]) / spec.sigma[i])
        z_hi.append((np.log(value + tol + EPS) - spec.mu[i]) / spec.sigma[i])
    score = np.stack([np.max(z_lo, axis=0) - F64, np.max(z_hi, axis=0) + F64], -1)
    return Tolerance(np.stack(raw, -1), score, e / 2 + F64, m[:, 0] > 2 * e)


def assert_verdicts_close(got, want, tol: Tolerance, calib, max_undecided: float = 0.1) -> None:
    """Another implementation's verdicts `got` against the reference's `want` (lists of detector.Verdict):
    components and confidence within `tol`, the score within its interval (the reference's too: a check on the
    tolerance's own arithmetic); the same verdict (clean / adversarial) except where the threshold lies in that
    interval, which it may for at most `max_undecided` of the inputs (a tolerance so loose it decides nothing
    fails here); the same predicted class unless a near-tie of the top two logits lets it change; the p-value
    one the score's interval allows (it is a step function of the score); the same passes. Fails naming the
    first input and field that disagree."""
    n = len(want)
    assert len(got) == n
    assert [g.passes for g in got] == [w.passes for w in want]
    assert all(g.names == w.names for g, w in zip(got, want, strict=True))
    undecided = 0
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        where = f"input {i}: got {g}\n want {w}"
        if tol.prediction_fixed[i]:
            assert g.index == w.index, where
        raw_g, raw_w = np.asarray(g.raw, np.float64), np.asarray(w.raw, np.float64)
        assert (np.abs(raw_g - raw_w) <= tol.raw[i]).all(), f"components beyond {tol.raw[i]}: {where}"
        lo, hi = tol.score[i]
        assert lo <= w.score <= hi, f"the reference's own score outside [{lo}, {hi}]: {where}"
        assert lo <= g.score <= hi, f"score outside [{lo}, {hi}]: {where}"
        assert abs(g.confidence - w.confidence) <= tol.confidence[i], f"confidence: {where}"
        assert g.threshold == w.threshold, where
        if lo <= w.threshold <= hi:
            undecided += 1
        else:
            assert g.verdict == w.verdict, f"verdict, threshold outside [{lo}, {hi}]: {where}"
        p_lo, p_hi = calib.p_value(np.array([hi, lo]))
        assert p_lo <= g.p_value <= p_hi, f"p-value outside [{p_lo}, {p_hi}]: {where}"
    assert undecided <= max_undecided * n, f"{undecided} of {n} inputs' score intervals hold the threshold"
