"""CUDA graph replay (backends/graphs.py): bucketing, padding, slicing, keys and the eager fallback.

CUDA graphs need a GPU (bench/gpu.py checks the real thing there). Here torch's CUDAGraph is stood in for by its
semantics — replay() recomputes the captured function from the static input into the same output tensors —
and everything of ours around it runs for real: the torch backend's forward, full and truncated.

Forwards compared here are across kernels (tests/tolerance.py): a replay forwards the padded bucket, not the
batch, and MKL / oneDNN pick their kernels by the rows per forward and the instruction set (and, without MKL's
reproducibility mode, may block a sum differently with its buffers' alignment), so they agree within the float32
tolerance of the model's reductions; copies of data (the uploads) are exact and compared bit for bit."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from nccr_guard.backends.graphs import GraphedForward, buckets
from nccr_guard.detector import Detector
from tests.conftest import MNIST
from tests.tolerance import assert_f32_close, reduction_length
from tests.unit.test_truncation import folder_watching

N_MNIST = reduction_length(MNIST / "model.onnx")  # the logits: 9 + 288 + 1600 + 128 terms in all
N_CONV2 = 9 + 32 * 9 + 5 * 5  # conv1, conv2, then the mean over its 5 x 5 pooled map (reduce_tensor)
N = {"logits": N_MNIST, "conv2": N_CONV2}


def replaying_capture(fn, static):
    """A CUDA graph's contract on the CPU: fixed output tensors, refreshed from the static input by replay()."""
    outs = fn(static)

    def replay():
        for o, new in zip(outs, fn(static), strict=True):
            o.copy_(new)

    return replay, outs


def stale_capture(fn, static):
    """A graph that does not recompute: what a model with host-side control flow would capture."""
    outs = tuple(o.clone() for o in fn(static))
    return (lambda: None), outs


def failing_capture(fn, static):
    raise RuntimeError("operation not permitted when stream is capturing")


def test_buckets_pad_by_at_most_a_quarter_and_cover_every_size():
    sizes = buckets(256)
    assert sizes[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16] and sizes[-3:] == [192, 224, 256]
    assert len(sizes) == 28
    g = GraphedForward(replaying_capture, 256)
    for n in range(1, 257):
        b = g.bucket(n)
        assert n <= b <= 1.25 * n
    assert g.bucket(257) is None
    assert buckets(100)[-1] == 100


@pytest.fixture
def backend(tmp_path):
    det = Detector.load(folder_watching(tmp_path, "conv2"), backend="torch", device="cpu", calibrated=False)
    assert det.backend.graphs is None and not det.backend.cuda_graphs  # the CPU never captures
    return det.backend


def test_replayed_forwards_equal_eager_ones_full_and_truncated(backend, mnist_test):
    xs = mnist_test[0]
    eager = {n: (backend.forward(xs[:n]), backend.forward(xs[:n], upto=["conv2"])) for n in (1, 7, 9, 10, 13)}
    backend.graphs = GraphedForward(replaying_capture, 12)
    assert backend.cuda_graphs
    for n in (10, 9, 7, 1, 13, 10):  # 9 after 10 reuses the 10-row graph, whose last row still holds old data
        full, cut = backend.forward(xs[:n]), backend.forward(xs[:n], upto=["conv2"])
        assert set(full) == {"logits", "conv2"} and set(cut) == {"conv2"}
        for got, want in ((full, eager[n][0]), (cut, eager[n][1])):
            for k in want:
                assert got[k].shape == want[k].shape
                assert_f32_close(got[k], want[k], N[k], err_msg=f"{k}, {n} rows")
    # one graph per (what is computed, bucket); 13 rows is over max_rows 12 and ran eagerly
    assert sorted((k[0], k[1]) for k in backend.graphs.graphs) == [
        ((), 1),
        ((), 7),
        ((), 10),
        (("conv2",), 1),
        (("conv2",), 7),
        (("conv2",), 10),
    ]


@pytest.mark.parametrize("capture", [stale_capture, failing_capture], ids=["disagrees", "fails"])
def test_a_bad_capture_turns_graphs_off_and_serves_eagerly(backend, mnist_test, caplog, capture):
    xs = mnist_test[0]
    want = backend.forward(xs[:3])
    backend.graphs = GraphedForward(capture, 8)
    with caplog.at_level(logging.WARNING, logger="nccr_guard"):
        first = backend.forward(xs[:3])
    assert not backend.cuda_graphs and backend.graphs.graphs == {}
    assert "CUDA graphs turned off" in caplog.text
    second = backend.forward(xs[3:6])
    assert_f32_close(first["logits"], want["logits"], N_MNIST)
    assert_f32_close(second["logits"], backend.forward(xs[3:6])["logits"], N_MNIST)


def test_stale_graph_is_caught_by_the_check(mnist_test):
    """The check compares the replay with an eager forward of the same padded batch: a graph frozen on the
    padding (zeros) instead of the batch fails it."""

    def frozen(fn, static):
        outs = tuple(o.clone() for o in fn(torch.zeros_like(static)))
        return (lambda: None), outs

    g = GraphedForward(frozen, 4)
    x = torch.as_tensor(mnist_test[0][:2])
    assert g(lambda t: (t.flatten(1).sum(1, keepdim=True),), x) is None
    assert not g.active


def test_a_bucket_where_eager_wins_the_race_stays_eager(backend, mnist_test):
    """With a clock (`sync`, torch.cuda.synchronize on a GPU) each new graph races the eager forward; a slower
    replay (here: 50 ms) leaves its bucket eager while graphs stay on for the others."""
    import time

    replays = []

    def slow_capture(fn, static):
        replay, outs = replaying_capture(fn, static)

        def slow():
            replays.append(len(static))
            time.sleep(0.05)
            replay()

        return slow, outs

    xs = mnist_test[0]
    want = backend.forward(xs[:3])
    backend.graphs = GraphedForward(slow_capture, 8, sync=lambda: None)
    got = backend.forward(xs[:3])  # capture: two checking replays, three timed ones
    assert len(replays) == 5
    assert backend.cuda_graphs and list(backend.graphs.graphs.values()) == [None]
    for _ in range(3):
        got = backend.forward(xs[:3])
        assert_f32_close(got["logits"], want["logits"], N_MNIST)
    assert len(replays) == 5  # the bucket's forwards run eagerly now


def test_uploads_are_exact_on_the_cpu_and_go_to_the_backends_device(backend):
    """The CPU forwards the array's own memory; another device gets torch's copy (the meta device stands in for a
    GPU here: shape and dtype, no values)."""
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    t = backend._to_device(x)
    assert t.device.type == "cpu" and np.shares_memory(t.numpy(), x)
    backend.torch_device = torch.device("meta")
    t = backend._to_device(x.astype(np.float64))
    assert t.device.type == "meta" and t.shape == x.shape and t.dtype == torch.float32
