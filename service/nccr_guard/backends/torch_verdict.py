"""A whole verdict of the nccr-v3 kind as one torch function on the model's device: inputs in; rows, forward
and scores out, as one (B, 3 + components) float64 tensor.

Why: on a GPU the engine around a graphed forward cost 4-5x the forward itself (docs/decisions/002-one-graph-verdict.md:
0.23x of a bare forward at 32 MNIST inputs): the rows as a handful of small kernels, a device-to-host copy
(and synchronisation) per output, numpy scoring and the Python between them. As one function, a CUDA graph
(backends/graphs.py) captures rows, forward and scoring together, and one small tensor crosses to the host:
on the H200 0.66-0.70x of the bare forward at 1-32 inputs, 3.4-5.0x the numpy engine's rate.
It is backends/onnx_verdict.py's graph in torch, built from the same `VerdictGraph` spec and repeating the
numpy engine's float32 operations in the same order (engine/score.py), so margin components come out bit for bit
on the CPU (a `change` component's mean over the logits may sum in another order); Detector checks it against the
numpy engine on a probe batch before using it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from nccr_guard.backends.onnx_verdict import VerdictGraph
from nccr_guard.backends.torch_rows import build_rows
from nccr_guard.engine.score import EPS

# Columns of the tensor the function returns, before the raw components.
SCORE, CONFIDENCE, PREDICTION = range(3)
RAW = 3


class _Constants:
    """The spec's arrays as device tensors, made once: a tensor made from host data inside a CUDA graph capture
    would be a host-to-device copy, which capture forbids."""

    def __init__(self, spec: VerdictGraph, device: torch.device) -> None:
        # each measure's component rows (VerdictGraph.by_measure), then where their columns go (VerdictGraph.back)
        self.cols = [(k, torch.tensor([spec.cols[i] for i in which], device=device)) for k, which in spec.by_measure]
        self.back = None if spec.back is None else torch.tensor(spec.back, dtype=torch.long, device=device)
        self.spread = None if spec.spread is None else torch.as_tensor(spec.spread, device=device)
        self.mu = torch.as_tensor(spec.mu, dtype=torch.float64, device=device)
        self.sigma = torch.as_tensor(spec.sigma, dtype=torch.float64, device=device)
        self.mean = None if spec.mean is None else torch.as_tensor(spec.mean, dtype=torch.float32, device=device)
        self.std = None if spec.std is None else torch.as_tensor(spec.std, dtype=torch.float32, device=device)


def scores(spec: VerdictGraph, c: _Constants, logits: torch.Tensor) -> torch.Tensor:
    """logits (B * rows, C) -> (B, 3 + n): score, confidence, prediction, raw components, as score_rows gives
    them for the variants the spec covers (class_margin, margin_moves, the `change` measure on the logits,
    standardise, confidence)."""
    lg = logits.float().reshape(-1, spec.rows, logits.shape[-1])
    l0 = lg[:, 0]
    pred = l0.argmax(-1)  # the first maximum, as numpy's argmax
    idx = pred[:, None, None].expand(-1, spec.rows, 1)
    top = lg.gather(2, idx)[..., 0]
    m = top - lg.scatter(2, idx, float("-inf")).amax(-1)  # (B, R) margin over the best other class
    m0 = m[:, :1]
    parts = []
    for kind, cols in c.cols:
        if kind == "change":
            moved = (lg.index_select(1, cols) - lg[:, :1]).abs() / c.spread
            parts.append(moved.mean(-1))
            continue
        delta = m0 - m.index_select(1, cols)
        moved = delta.clamp_min(0.0) if kind == "margin" else delta.abs()
        parts.append(moved / m0.abs().clamp_min(EPS))
    raw = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    raw = (raw if c.back is None else raw.index_select(1, c.back)).double()
    score = (((raw + EPS).log() - c.mu) / c.sigma).amax(-1)
    conf = torch.softmax(l0.double(), -1).gather(1, pred[:, None])[:, 0]
    return torch.cat([score[:, None], conf[:, None], pred.double()[:, None], raw], 1)


def verdict_fn(
    spec: VerdictGraph, forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device
) -> Callable[[torch.Tensor], tuple[torch.Tensor]]:
    """inputs (B, *shape) float32 on `device` -> (scores,): rows normalised as Detector.forward does it,
    `forward` (rows -> logits), then `scores`. Deterministic squeezes only, so a CUDA graph can capture it."""
    c = _Constants(spec, device)

    def fn(x: torch.Tensor) -> tuple[torch.Tensor]:
        rows = build_rows(x, spec.perturbations, None, spec.value_range).reshape(-1, *x.shape[1:])
        if c.mean is not None:
            rows = (rows - c.mean) / c.std
        return (scores(spec, c, forward(rows)),)

    return fn


def split(out: np.ndarray) -> list[np.ndarray]:
    """The function's (B, 3 + n) result as engine.Scores' four arrays (score, raw, prediction, confidence)."""
    return [out[:, SCORE], np.ascontiguousarray(out[:, RAW:]), out[:, PREDICTION].astype(np.int64), out[:, CONFIDENCE]]
