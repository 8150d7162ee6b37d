"""Truncated forward: perturbed copies run only as deep as the verdict reads them, in both backends, and give
the same watched activations as the full network.

Across kernels (tests/tolerance.py): the truncated copies run as a forward of their own (another batch, in ONNX
Runtime another graph), so they agree with the full network's within the float32 tolerance of the reductions
before the watched layer."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from nccr_guard.detector import Detector
from nccr_guard.engine import get_variant
from tests.conftest import MNIST
from tests.tolerance import assert_f32_close, reduction_length

CONV2_ONNX = "/model/conv2/conv2.2/MaxPool_output_0"  # the exported tensor of the module `conv2`

HIDDEN = get_variant("hidden-change")  # reads only a hidden layer of the copies
N_LOGITS = reduction_length(MNIST / "model.onnx")
N_CONV2 = 9 + 32 * 9 + 5 * 5  # conv1, conv2, and the mean over the 5 x 5 pooled map the detector reads


def folder_watching(tmp_path, layer: str):
    """The MNIST model folder watching `layer` (a module name for torch, a tensor name for ONNX)."""
    out = tmp_path / layer.strip("/").replace("/", "_")
    out.mkdir()
    for f in ("weights.pt", "model.onnx"):
        shutil.copy(MNIST / f, out / f)
    toml = (MNIST / "model.toml").read_text().replace('watch = ["fc1"]', f'watch = ["{layer}"]')
    (out / "model.toml").write_text(toml.replace('calibration = "calibration.npz"\n', ""))
    return out


@pytest.mark.parametrize(("backend", "layer"), [("torch", "conv2"), ("onnx", CONV2_ONNX)])
def test_truncated_copies_give_the_same_watched_activations(tmp_path, mnist_test, backend, layer):
    det = Detector.load(folder_watching(tmp_path, layer), backend=backend, device="cpu", calibrated=False)
    det.variant = HIDDEN
    assert det.truncation == [layer]
    xs = list(mnist_test[0][:5])
    cut = det.activations(xs)
    det.use_truncation = False
    assert det.truncation is None
    full = det.activations(xs)
    assert_f32_close(cut[layer], full[layer], N_CONV2)
    assert_f32_close(cut["logits"][:, 0], full["logits"][:, 0], N_LOGITS)
    assert np.isnan(cut["logits"][:, 1:]).all()  # the copies' logits were never computed


def test_torch_truncation_stops_before_the_rest_of_the_network(tmp_path, mnist_test):
    det = Detector.load(folder_watching(tmp_path, "conv2"), backend="torch", device="cpu", calibrated=False)
    calls = []
    det.backend.module.fc1.register_forward_hook(lambda _m, i, _o: calls.append(len(i[0])))
    det.backend.forward(mnist_test[0][:7], upto=["conv2"])
    assert calls == []
    det.backend.forward(mnist_test[0][:7])
    assert calls == [7]


def test_onnx_truncation_runs_a_smaller_graph(tmp_path):
    import onnx

    from nccr_guard.backends.onnx_backend import _truncated

    sub = onnx.load_from_string(_truncated(str(MNIST / "model.onnx"), "input", [CONV2_ONNX]))
    ops = [n.op_type for n in sub.graph.node]
    assert "Gemm" not in ops and ops.count("Conv") == 2 and [o.name for o in sub.graph.output] == [CONV2_ONNX]


def test_default_variants_read_logits_of_copies_so_nothing_is_truncated(detector):
    assert get_variant("nccr-v3").copy_layers(["fc1"]) is None
    assert get_variant("nccr-audio-v1").copy_layers(["partials", "embed"]) is None
    assert detector.truncation is None
    assert HIDDEN.copy_layers(["conv1", "conv2"]) == ["conv2"]


def test_rows_built_in_torch_are_truncated_too(tmp_path, mnist_test):
    """The CUDA path (rows built next to the model, `forward_perturbed`), exercised on the CPU."""
    det = Detector.load(folder_watching(tmp_path, "conv2"), backend="torch", device="cpu", calibrated=False)
    det.variant = HIDDEN
    det.backend.device_rows = True
    xs = list(mnist_test[0][:4])
    cut = det.activations(xs)
    det.use_truncation = False
    full = det.activations(xs)
    assert np.isnan(cut["logits"][:, 1:]).all() and not np.isnan(full["logits"]).any()
    assert_f32_close(cut["logits"][:, 0], full["logits"][:, 0], N_LOGITS)
    assert_f32_close(cut["conv2"], full["conv2"], N_CONV2)  # same seed, same copies
