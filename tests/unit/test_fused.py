"""The one-graph verdict (backends/onnx_verdict.py, and its torch twin backends/torch_verdict.py) gives the numpy
engine's verdicts, and steps aside where it cannot: other variants, torch on the CPU, `fuse=False`, a model graph
it cannot extend.

Two kinds of comparison (tests/tolerance.py): ONNX Runtime's graph against ONNX Runtime's forward of the same
model and the numpy engine is exact by construction (the same kernels compute each row's logits whatever the
batch; the scoring is correctly rounded float32 steps in the engine's order, sums written out in numpy's), so
components, predictions and verdicts are compared bit for bit (`assert_same`); torch's function against torch's
forward and the numpy engine is across kernels (MKL / oneDNN pick their GEMM and convolution kernels by
instruction set and by the rows per forward, and the fused function forwards other row counts), so it is compared
within the float32 tolerance of the model's reductions (`assert_close`)."""

from __future__ import annotations

import dataclasses
import logging
import shutil

import numpy as np
import onnx
import pytest

from nccr_guard.backends import make_backend
from nccr_guard.backends.graphs import GraphedForward
from nccr_guard.backends.onnx_verdict import PREFIX
from nccr_guard.detector import Detector
from nccr_guard.engine import Calibration, get_variant
from nccr_guard.manifest import load_manifest
from tests.conftest import MNIST
from tests.tolerance import F64, U32, assert_verdicts_close, reduction_length, verdict_tolerance
from tests.unit.test_graphs import replaying_capture

N_MNIST = reduction_length(MNIST / "model.onnx")  # 9 + 288 + 1600 + 128


def load(folder, backend: str, fuse: bool = True) -> Detector:
    """A detector on `backend`; torch fuses as it does on CUDA (on the CPU it is off for speed, not correctness)."""
    det = Detector.load(folder, backend=backend, device="cpu", fuse=fuse)
    det.backend.fuses_verdicts = True
    return det


@pytest.fixture(scope="module")
def pair(mnist_v3):
    """MNIST as nccr-v3 on ONNX, fused and not."""
    return (
        Detector.load(mnist_v3, backend="onnx", device="cpu"),
        Detector.load(mnist_v3, backend="onnx", device="cpu", fuse=False),
    )


def inputs(mnist_test, n: int = 24) -> np.ndarray:
    """Held-out digits, the same with sign noise of eps 0.2 (FGSM-like, many flagged), and uniform noise."""
    x = mnist_test[0][:n]
    rng = np.random.default_rng(1)
    noisy = np.clip(x + 0.2 * np.sign(rng.standard_normal(x.shape)), 0, 1).astype(np.float32)
    return np.concatenate([x, noisy, rng.random((4, *x.shape[1:]), np.float32)])


def assert_same(fused, plain) -> None:
    """Exact by construction (ONNX Runtime against ONNX Runtime and the numpy engine): verdicts, predictions and
    float32 components bit for bit; only the float64 log / softmax after them (ONNX Runtime's against numpy's
    implementation) within a few ulps, and the p-value (a step of the score) one of its neighbours."""
    assert [v.verdict for v in fused] == [v.verdict for v in plain]
    assert [v.index for v in fused] == [v.index for v in plain]
    assert [v.components for v in fused] == [v.components for v in plain]  # float32 arithmetic: bit for bit
    assert [v.passes for v in fused] == [v.passes for v in plain]
    np.testing.assert_allclose([v.score for v in fused], [v.score for v in plain], rtol=0, atol=F64)
    np.testing.assert_allclose([v.confidence for v in fused], [v.confidence for v in plain], rtol=0, atol=F64)
    np.testing.assert_allclose([v.p_value for v in fused], [v.p_value for v in plain], rtol=0, atol=0.01)


def assert_close(fused, plain, ref: Detector, xs: np.ndarray) -> None:
    """Across kernels (torch's function against torch's forward and the numpy engine): `fused` against `plain`,
    the reference detector `ref`'s verdicts of `xs`, within the tolerance its logits of `xs` give (components,
    score, confidence, p-value), the verdicts exactly except within that tolerance of the threshold."""
    tol = verdict_tolerance(ref.verdict_spec(classes=10), ref.activations(xs)["logits"], N_MNIST)
    assert_verdicts_close(fused, plain, tol, ref.calib)


def test_fused_verdicts_are_the_numpy_engines(pair, mnist_test):
    fused, plain = pair
    assert fused.fused and not plain.fused
    xs = inputs(mnist_test)
    want = plain.detect(xs)
    assert 5 < sum(v.adversarial for v in want) < len(xs) - 5  # both verdicts occur
    assert_same(fused.detect(xs), want)
    assert_same(fused.detect(xs, chunk=7), want)  # in forwards of 7 (the last one 3)
    assert_same([fused.detect(x[None])[0] for x in xs[:5]], want[:5])  # one input per call, as the server sends


def test_the_watched_layer_session_is_released_and_rebuilt_on_demand(mnist_test, mnist_v3):
    """Before it builds the graph the detector drops the session it will no longer read (its memory:
    bench/fused_memory.py); anything that forwards rows afterwards gets it back, with the same outputs (the
    numpy engine after a fallback too: test_a_graph_it_cannot_extend_scores_in_numpy)."""
    fused = Detector.load(mnist_v3, backend="onnx", device="cpu")
    plain = Detector.load(mnist_v3, backend="onnx", device="cpu", fuse=False)
    xs = inputs(mnist_test, 4)
    assert fused.backend._session is not None
    assert fused.fused and fused.backend._session is None
    assert plain.backend._session is not None  # never released where the graph is not used
    got, want = fused.activations(xs), plain.activations(xs)
    assert fused.backend._session is not None and got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert_same(fused.detect(xs), plain.detect(xs))


def test_torch_one_function_verdicts_are_the_numpy_engines(mnist_test, mnist_v3):
    """The torch twin, eagerly and replayed from (stand-in) CUDA graphs: the numpy engine's verdicts (across
    kernels: within the float32 tolerance of the model's reductions, the verdicts exactly away from the
    threshold); a batch whose rows exceed the graphs' largest bucket replays in chunks that fit it, and an input
    whose rows alone exceed it runs eagerly."""
    fused, plain = load(mnist_v3, "torch"), load(mnist_v3, "torch", fuse=False)
    assert fused.fused and not plain.fused
    xs = inputs(mnist_test)
    want = plain.detect(xs)

    def check(got, want):  # every comparison here is across kernels
        assert_close(got, want, plain, xs[: len(want)])

    check(fused.detect(xs), want)
    fused.backend.graphs = GraphedForward(replaying_capture, 64)  # 16 inputs of 4 rows
    check(fused.detect(xs, chunk=9), want)
    check([fused.detect(x[None])[0] for x in xs[:3]], want[:3])
    keys = {(k[0], k[1]) for k in fused.backend.graphs.graphs}
    assert keys == {(("verdict",), 10), (("verdict",), 7), (("verdict",), 1)}  # 9 inputs padded to 10; 52 = 5 * 9 + 7
    check(fused.detect(xs[:20]), want[:20])  # 80 rows: replays of 16 inputs, then of 4
    keys = {(k[0], k[1]) for k in fused.backend.graphs.graphs}
    assert keys == {(("verdict",), n) for n in (16, 10, 7, 4, 1)}
    fused.backend.graphs = GraphedForward(replaying_capture, 3)  # fewer rows than one input has: eager
    check(fused.detect(xs[:6]), want[:6])
    assert not fused.backend.graphs.graphs
    assert not Detector.load(mnist_v3, backend="torch", device="cpu").fused  # off on the CPU by default


@pytest.mark.parametrize("variant", ["nccr-v3", "margin", "nccr-v3-median"])
def test_torch_scoring_is_the_numpy_engines_on_the_same_logits(variant, mnist_test, mnist_v3):
    """The part of the torch function after the forward, on the logits the numpy engine scored: exact by
    construction (the same correctly rounded float32 steps in the same order), so components and predictions bit
    for bit, the float64 log and softmax within a few ulps; only a `change` component's mean over the logits
    sums in torch's order, within the float32 rounding of a sum of C terms. What the verdict comparisons above
    must leave to the forward's tolerance is thereby checked to the last bit here."""
    import torch

    from nccr_guard.backends.torch_verdict import _Constants, scores, split
    from nccr_guard.calibrate import calibrate
    from nccr_guard.engine import score_rows

    det = load(mnist_v3, "torch", fuse=False)
    if variant == "margin":
        v3 = det.variant
        det.variant = dataclasses.replace(
            v3, components=tuple(dataclasses.replace(c, measure="margin") for c in v3.components)
        )
    elif variant == "nccr-v3-median":
        det.variant = get_variant(variant)
        det.calib = calibrate(mnist_v3, variant=variant, write=False, backend="onnx")
    acts = det.activations(inputs(mnist_test))
    want = score_rows(det.variant, det.calib, acts)
    spec = det.verdict_spec(classes=10)
    logits = acts["logits"]
    score, raw, pred, conf = split(
        scores(spec, _Constants(spec, torch.device("cpu")), torch.from_numpy(logits)).numpy()
    )
    np.testing.assert_array_equal(pred, want.prediction)
    change = np.array([m == "change" for m in spec.measures])
    np.testing.assert_array_equal(raw[:, ~change], want.raw[:, ~change])
    sums = 2 * logits.shape[-1] * U32 * np.abs(want.raw[:, change])  # two orders of a float32 sum of C terms
    assert (np.abs(raw[:, change] - want.raw[:, change]) <= sums).all()
    assert change.any() == (variant == "nccr-v3-median")
    np.testing.assert_allclose(score, want.score, rtol=0, atol=F64 if not change.any() else 1e-5)
    np.testing.assert_allclose(conf, want.confidence, rtol=0, atol=F64)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_margin_measure_and_a_normalised_input_range(tmp_path, mnist_test, backend, mnist_v3):
    """The graph's other branches: bit-depth squeezes of a [-1, 1] input, normalisation before the model, and
    the one-sided margin drop; the detector rebuilds the graph when its variant is replaced. ONNX: exact by
    construction; torch: across kernels."""
    folder = tmp_path / "mnist-pm1"
    shutil.copytree(mnist_v3, folder)
    toml = (folder / "model.toml").read_text()
    toml = toml.replace("range = [0.0, 1.0]", "range = [-1.0, 1.0]").replace("mean = [0.0]", "mean = [-0.5]")
    (folder / "model.toml").write_text(toml.replace("std = [1.0]", "std = [2.0]"))
    fused, plain = (load(folder, backend, fuse=f) for f in (True, False))
    xs = inputs(mnist_test, 8) * 2 - 1
    assert fused.fused and not fused._identity

    def check(got, want):
        if backend == "onnx":
            assert_same(got, want)
        else:
            assert_close(got, want, plain, xs)

    check(fused.detect(xs), plain.detect(xs))
    v3 = fused.variant
    drop = dataclasses.replace(v3, components=tuple(dataclasses.replace(c, measure="margin") for c in v3.components))
    fused.variant = plain.variant = drop
    assert fused.fused
    check(fused.detect(xs), plain.detect(xs))
    assert fused._fused_for[0] is drop


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_a_median_filter_and_the_logit_change(backend, mnist_test, mnist_v3):
    """nccr-v3-median: a 2x2 median filter row after the bit-depth squeezes, and besides margin components a
    `change` component (every logit's move against its clean spread, averaged; the ONNX graph sums the logits in
    numpy's pairwise order): on ONNX the numpy engine's verdicts bit for bit (exact by construction); torch's
    function (CUDA's, run here on the CPU) across kernels: within the float32 tolerance of the model's
    reductions, as its convolutions round differently with the rows per forward and its mean sums in its own
    order."""
    from nccr_guard.calibrate import calibrate

    calib = calibrate(mnist_v3, variant="nccr-v3-median", write=False, backend="onnx")
    fused, plain = (load(mnist_v3, backend, fuse=f) for f in (True, False))
    for det in (fused, plain):
        det.variant, det.calib = get_variant("nccr-v3-median"), calib
    assert fused.fused and not plain.fused
    xs = inputs(mnist_test)
    xs[-1, 0, :, :9] = 1.0  # a bright edge: the filter's padded border differs from the image's inside
    want = plain.detect(xs)
    assert 5 < sum(v.adversarial for v in want) < len(xs) - 5
    runs = [fused.detect(xs), fused.detect(xs, chunk=5)]
    if backend == "torch":  # and replayed from (stand-in) CUDA graphs, in chunks of the largest bucket
        fused.backend.graphs = GraphedForward(replaying_capture, 64)
        runs.append(fused.detect(xs))
        assert {k[0] for k in fused.backend.graphs.graphs} == {("verdict",)}
    for got in runs:
        if backend == "onnx":
            assert_same(got, want)
        else:
            assert_close(got, want, plain, xs)
    spec = fused.verdict_spec(classes=10)
    assert spec.medians == (2,) and spec.measures.count("change") == 1 and spec.spread.shape == (1, 10)


def test_where_the_graph_does_not_apply(mnist_v3):
    noisy = Detector.load(mnist_v3, backend="onnx", device="cpu")
    noisy.variant = get_variant("nccr-v2")  # Gaussian copies: drawn from numpy's generator, not in the graph
    assert not noisy.fused
    median = Detector.load(mnist_v3, backend="onnx", device="cpu")
    median.variant = get_variant("nccr-v3-median")  # a calibration without the median row's logit spreads
    assert not median.fused
    assert not Detector.load(mnist_v3, backend="torch", device="cpu").fused
    assert not Detector.load(mnist_v3, backend="onnx", device="cpu", calibrated=False).fused
    assert not Detector.load(MNIST, backend="onnx", device="cpu").fused  # the served nccr-v4: a weighted sum


def test_a_graph_it_cannot_extend_scores_in_numpy(tmp_path, mnist_test, caplog, mnist_v3):
    """A model already using the graph's tensor prefix: a warning, the numpy engine, the same verdicts."""
    model = onnx.load(MNIST / "model.onnx")
    old = model.graph.node[0].output[0]
    for node in model.graph.node:
        node.input[:] = [f"{PREFIX}x" if n == old else n for n in node.input]
        node.output[:] = [f"{PREFIX}x" if n == old else n for n in node.output]
    folder = tmp_path / "prefixed"
    shutil.copytree(mnist_v3, folder)
    onnx.save(model, folder / "model.onnx")
    ref = Detector.load(mnist_v3, backend="onnx", device="cpu", fuse=False)
    manifest = load_manifest(folder)  # the renamed graph, same weights: the calibration still fits
    det = Detector(
        manifest, make_backend("onnx", manifest), ref.variant, Calibration.load(ref.manifest.calibration_path)
    )
    with caplog.at_level(logging.WARNING):
        assert not det.fused
    assert "verdict graph not used" in caplog.text and PREFIX in caplog.text
    xs = inputs(mnist_test, 4)
    assert_same(det.detect(xs), ref.detect(xs))


def test_the_graphs_two_ends_apart_compose_to_the_whole(pair, mnist_test):
    """bench.fused_parts times the rows end and the scoring end of the graph alone: the rows end gives the
    engine's rows to the model (its logits as the bare model's on those rows), and the scoring end on those rows
    scores as the whole graph does on the inputs."""
    import onnxruntime as ort

    from nccr_guard.backends.onnx_verdict import INPUT, OUTPUTS, fuse

    det = pair[0]
    shape = list(det.manifest.input.shape)
    path = det.manifest.path(det.manifest.weights.onnx)
    spec = det.verdict_spec(classes=10)
    xs = inputs(mnist_test, 6)
    rows = det.batch_rows(list(xs)).reshape(-1, *shape).astype(np.float32)

    def run(model, feed):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)

    plain = onnx.load(path)
    name = plain.graph.input[0].name
    [bare] = run(plain, {name: rows})[:1]
    [logits] = run(fuse(onnx.load(path), spec, shape, scores=False), {INPUT: xs})[:1]
    np.testing.assert_array_equal(logits, bare)
    scored = run(fuse(onnx.load(path), spec, shape, rows=False), {name: rows})
    whole = run(fuse(onnx.load(path), spec, shape), {INPUT: xs})
    assert len(scored) == len(whole) == len(OUTPUTS)
    for a, b in zip(scored, whole, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("families", "value_range"),
    [
        ((("bitdepth", 3), ("bitdepth", 1), ("median", 2)), (0.0, 1.0)),
        ((("median", 3),), (0.0, 1.0)),
        ((("bitdepth", 2), ("median", 2), ("median", 3)), (-1.0, 1.0)),
    ],
)
def test_the_rows_end_builds_the_engines_rows_bit_for_bit(families, value_range, mnist_test):
    """The graph's rows end on a model that only flattens its input: bit-depth squeezes and 2x2 (min/max) and
    3x3 (TopK) median filters give perturb.build_batch's rows exactly, edges (padding) and clipping included."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from nccr_guard.backends.onnx_verdict import INPUT, VerdictGraph, fuse
    from nccr_guard.engine.perturb import Perturbation, build_batch

    shape = [1, 28, 28]
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["y"])],
        "flatten",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 784])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    perturbations = tuple(Perturbation(f, s) for f, s in families)
    spec = VerdictGraph(perturbations, value_range, None, None, (), (), None, np.zeros(0), np.ones(0), 784)
    fused = fuse(model, spec, shape, scores=False)
    session = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
    lo, hi = value_range
    rng = np.random.default_rng(0)
    xs = np.concatenate([mnist_test[0][:6] * (hi - lo) + lo, rng.uniform(lo, hi, (4, *shape))]).astype(np.float32)
    xs[-1, 0, :, 0] = hi  # a saturated edge column, where the padding is read
    [got] = session.run(None, {INPUT: xs})
    want = build_batch(xs, perturbations, None, value_range).reshape(len(got), -1)
    np.testing.assert_array_equal(got, want)


def test_a_change_components_mean_sums_as_numpy_does():
    """The graph's mean over the logits equals numpy's float32 `mean` bit for bit up to PAIRWISE_MAX classes
    (exact by construction: numpy's pairwise order written out as Add nodes), and beyond it (ReduceMean, across
    kernels: its own order) within the float32 tolerance of a sum of n terms."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from nccr_guard.backends import onnx_verdict as ov

    for n in [*range(1, ov.PAIRWISE_MAX + 1), 100]:
        graph = helper.make_graph(
            [],
            "mean",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, n])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        )
        b = ov._Builder(graph, 17)
        b.op("Identity", ov._mean_last(b, "x", n, 2), out="y")
        graph.node.extend(b.nodes)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(n)
        x = (rng.standard_normal((400, 2, n)) * rng.uniform(0.01, 100, (400, 2, 1))).astype(np.float32)
        [got] = session.run(None, {"x": x})
        if n <= ov.PAIRWISE_MAX:
            np.testing.assert_array_equal(got, x.mean(-1), err_msg=f"{n} classes")
        else:
            bound = 2 * n * U32 * np.abs(x).mean(-1)  # two orders of a sum of n: (n - 1) u sum|x| each, / n
            assert (np.abs(got - x.mean(-1)) <= bound).all()
