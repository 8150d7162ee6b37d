"""Bringing one's own model, as a new user does: an ONNX file from torch.onnx.export's default exporter (its
weights in `model.onnx.data`, its tensors named after operations), its layers listed, calibrated on a folder of
PNGs, served beside the default models with one flag, on a backend the speaker model has no weights for; and
evaluated on a labelled data folder. Real files, the real console script, a real server on loopback."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tomllib
import warnings

import numpy as np
import pytest
import torch

from nccr_guard.detector import Detector
from nccr_guard.manifest import ManifestError, load_manifest
from tests.conftest import BIN, MNIST, start_server, to_png

MNIST_TOML = (MNIST / "model.toml").read_text()


def run(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN), *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def own_toml(name: str, watch: str, weights: str) -> str:
    """The shipped MNIST manifest, renamed, watching `watch`, with `weights` and no [split] (none to point to)."""
    body = MNIST_TOML.split("[split]")[0].split("[weights]")[0]
    body = body.replace('name = "mnist"', f'name = "{name}"').replace('watch = ["fc1"]', f'watch = ["{watch}"]')
    body = re.sub(r'(?m)^variant = ".*"\n', "", body)  # the engine default: nccr-v4 fits on attacks of a dev split
    return f"{body}[weights]\n{weights}\n"


@pytest.fixture(scope="module")
def clean_pngs(tmp_path_factory, mnist_test) -> list:
    """100 held-out digits as PNG files, spread over the classes, in one subfolder per label."""
    folder = tmp_path_factory.mktemp("labelled")
    x, y = mnist_test
    files = []
    for i in range(0, len(x), 5):
        (folder / str(y[i])).mkdir(exist_ok=True)
        files.append(to_png(x[i], folder / str(y[i]) / f"{i}.png"))
    return files


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory, clean_pngs):
    """The MNIST network exported by torch.onnx.export with its defaults, calibrated on the PNG folder."""
    from nccr_guard.layers import onnx_layers
    from nccr_guard.nets import MnistCNN

    folder = tmp_path_factory.mktemp("own") / "digits"
    folder.mkdir()
    net = MnistCNN()
    net.load_state_dict(torch.load(MNIST / "weights.pt", weights_only=True))
    with warnings.catch_warnings():  # torch's exporter trips over its own deprecations (FutureWarning)
        warnings.simplefilter("ignore")
        x, batch = torch.zeros(2, 1, 28, 28), {"input": {0: "batch"}}
        torch.onnx.export(net.eval(), (x,), str(folder / "model.onnx"), input_names=["input"], dynamic_axes=batch)
    assert (folder / "model.onnx.data").stat().st_size > 100_000  # the weights are there, not in model.onnx
    (folder / "model.toml").write_text(own_toml("digits", "?", 'onnx = "model.onnx"'))
    relus = [layer.name for layer in onnx_layers(load_manifest(folder)) if layer.op == "Relu"]
    (folder / "model.toml").write_text(own_toml("digits", relus[-1], 'onnx = "model.onnx"'))  # fc1's activation
    r = run("calibrate", "--model", str(folder), "--data", str(clean_pngs[0].parents[1]))
    assert r.returncode == 0, r.stderr[-2000:]
    return folder


def test_a_logistic_variant_without_a_dev_split_says_what_to_calibrate_instead(onnx_model, tmp_path, clean_pngs):
    """nccr-v4 (the MNIST default) fits its combiner on attacks of a dev split: on a model without one (a user's
    folder of clean files) calibrate says so and names the flag that works, instead of a bare missing split."""
    folder = tmp_path / "digits"
    shutil.copytree(onnx_model, folder)
    toml = (folder / "model.toml").read_text()
    (folder / "model.toml").write_text(toml.replace('calibration = "', 'variant = "nccr-v4"\ncalibration = "', 1))
    r = run("calibrate", "--model", str(folder), "--data", str(clean_pngs[0].parents[1]))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "fits its combiner on attacks of the dev split" in r.stderr and "--variant nccr-v3" in r.stderr


def test_layers_lists_an_exported_graphs_tensors_and_a_torch_models_modules(onnx_model):
    r = run("layers", "--model", str(onnx_model), "--json")
    assert r.returncode == 0, r.stderr
    layers = [json.loads(line) for line in r.stdout.splitlines()]
    watched = [x for x in layers if x["watched"]]
    assert len(watched) == 1 and watched[0]["op"] == "Relu" and watched[0]["neurons"] == 128
    assert watched[0]["shape"][1:] == [128] and all(x["backend"] == "onnx" for x in layers)
    convs = [x for x in layers if x["op"] == "Conv"]
    assert [x["neurons"] for x in convs] == [32, 64] and convs[0]["shape"][1:] == [32, 26, 26]
    r = run("layers", "--model", str(MNIST), "--backend", "torch")
    assert r.returncode == 0, r.stderr
    table = r.stdout.splitlines()
    assert "13 torch layers" in table[0]
    assert any(line.startswith("* fc1 ") and "[batch, 128]" in line for line in table)
    r = run("layers", "--model", str(MNIST / "missing"))
    assert r.returncode == 2 and "no model.toml" in r.stderr and "Traceback" not in r.stderr


def test_external_weights_are_hashed_and_swapped_ones_refused(onnx_model, tmp_path, caplog):
    meta = json.loads(str(np.load(onnx_model / "calibration.npz")["meta"]))
    assert set(meta["weights_sha256"]) == {"model.onnx", "model.onnx.data"}
    Detector.load(onnx_model, backend="onnx", device="cpu")
    assert Detector.load(onnx_model, backend="torch", device="cpu").backend.name == "onnx"  # no torch weights
    swapped = tmp_path / "swapped"
    shutil.copytree(onnx_model, swapped)
    data = bytearray((swapped / "model.onnx.data").read_bytes())
    data[1000:1004] = np.float32(0.5).tobytes()  # one weight changed; model.onnx is untouched
    (swapped / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"made for model.onnx.data .*nccr-guard calibrate"):
        Detector.load(swapped, backend="onnx", device="cpu")
    from nccr_guard.engine import Calibration

    old = Calibration.load(onnx_model / "calibration.npz")  # as made before external data were hashed
    del old.meta["weights_sha256"]["model.onnx.data"]
    old.save(swapped / "calibration.npz")
    with caplog.at_level(logging.WARNING, logger="nccr_guard.detector"):
        Detector.load(swapped, backend="onnx", device="cpu")
    assert "no sha256 of model.onnx.data" in caplog.text


def test_one_flag_adds_a_model_and_onnx_serves_what_has_no_onnx_weights(onnx_model, clean_pngs, tmp_path):
    """`--add-model DIR` serves DIR beside the default models; `--backend onnx` serves the speaker model (no
    ONNX file) on torch with a warning. On the same server: a 0-255 tensor to a 0-1 model is a 400, and every
    line of the service log is JSON."""
    s = start_server(tmp_path, "--add-model", str(onnx_model), "--backend", "onnx", "--no-access-log")
    try:
        with s.client() as c:
            cards = {m["name"]: m for m in c.get("/v1/models").json()}
            assert set(cards) == {"mnist", "photo", "speaker", "digits"}
            assert {n: m["backend"] for n, m in cards.items()} == {
                "mnist": "onnx",
                "photo": "onnx",
                "speaker": "torch",
                "digits": "onnx",
            }
            assert c.get("/v2/models/speaker").json()["platform"] == "nccr-guard/torch"
            assert c.get("/v2/models/digits").json()["platform"] == "nccr-guard/onnx"
            r = c.post("/v1/detect?model=digits", files={"file": clean_pngs[0].read_bytes()})
            assert r.status_code == 200 and r.json()["prediction"]["label"] == clean_pngs[0].parent.name
            _check_input_ranges(c)
    finally:
        s.stop_cleanly()
    lines = s.log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses
    warned = [r for r in records if r["level"] == "WARNING" and r["msg"].startswith("speaker: no onnx weights")]
    assert len(warned) == 1 and "served on the torch backend" in warned[0]["msg"]


def _check_input_ranges(c) -> None:
    pixels = np.zeros((1, 1, 28, 28), np.float32)
    pixels[0, 0, 8:20, 12:16] = 255.0  # a 1 drawn in 0-255 values

    def infer(x: np.ndarray):
        t = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        return c.post("/v2/models/mnist/infer", json={"inputs": [t]})

    r = infer(pixels)
    assert r.status_code == 400
    assert "outside the input range [0, 1] of model 'mnist'" in r.json()["error"] and "255" in r.json()["error"]
    assert infer(pixels / 255).status_code == 200
    assert infer(np.clip(pixels / 255 + 0.005, 0, 1.005)).status_code == 200  # rounding is no mismatch
    assert infer(pixels / 255 - 0.5).status_code == 400  # centred values to a 0-1 model


def test_two_models_of_one_name_are_refused(tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(MNIST, twin)
    with pytest.raises(RuntimeError, match=r"two models named 'mnist'"):
        start_server(tmp_path, "--add-model", str(twin), ready_timeout=120)


def test_model_folders_from_the_environment(tmp_path, monkeypatch):
    from nccr_guard.config import Settings

    monkeypatch.setenv("NCCR_GUARD_ADD_MODEL", f"{tmp_path}/a, {tmp_path}/b")
    monkeypatch.setenv("NCCR_GUARD_MODELS", json.dumps([str(MNIST)]))
    s = Settings()
    assert s.served_models == [MNIST, tmp_path / "a", tmp_path / "b"]
    assert Settings(models=[MNIST], add_model=[MNIST / "."]).served_models == [MNIST]  # one folder, served once


def test_evaluate_takes_a_labelled_folder_for_a_model_without_splits(clean_pngs, tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    for f in ("weights.pt", "model.onnx", "calibration.npz"):
        shutil.copy(MNIST / f, own / f)
    weights = 'torch_module = "nccr_guard.nets:MnistCNN"\nstate_dict = "weights.pt"\nonnx = "model.onnx"'
    (own / "model.toml").write_text(own_toml("own", "fc1", weights))
    assert "split" not in tomllib.loads((own / "model.toml").read_text())
    env = {"NCCR_GUARD_CACHE": str(tmp_path / "cache")}
    out, data = tmp_path / "report", clean_pngs[0].parents[1]
    r = run("evaluate", "--model", str(own), "--attacks", "fgsm", "--n", "50", "--out", str(out), env=env)
    assert r.returncode == 2 and "pass --data" in r.stderr and "Traceback" not in r.stderr
    r = run(
        "evaluate",
        "--model",
        str(own),
        "--data",
        str(data),
        "--attacks",
        "fgsm",
        "--n",
        "50",
        "--out",
        str(out),
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["model"] == "own" and ev["data"] == str(data) and ev["split"].startswith("data-")
    assert 45 <= ev["n_clean"] <= 50 and ev["clean_accuracy"] >= 0.9  # half of the 100 digits, attacked
    assert ev["attacks"]["fgsm"]["n_adversarial"] > 0 and "nccr" in ev["attacks"]["fgsm"]["detectors"]


def test_an_onnx_file_with_a_fixed_batch_is_refused_with_the_export_flag_to_use(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from nccr_guard.backends import BackendError, make_backend

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 1, 28, 28])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 784])
    graph = helper.make_graph([helper.make_node("Flatten", ["input"], ["logits"])], "fixed", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "model.onnx")
    (tmp_path / "model.toml").write_text(own_toml("fixed", "logits", 'onnx = "model.onnx"'))
    with pytest.raises(BackendError, match=r"fixed batch of 2; export it with a dynamic batch axis"):
        make_backend("onnx", load_manifest(tmp_path), device="cpu")
