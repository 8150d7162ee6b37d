"""Open Inference Protocol (KServe v2) conformance with real clients against a real `nccr-guard serve --api-key`
on 127.0.0.1, in JSON and binary tensor modes: NVIDIA's `tritonclient.http` (the geventhttpclient client, which
sends a JSON body with no Content-Type, and the asyncio client, which declares it `application/octet-stream`) for
server live / ready / metadata, model metadata and ready (version-less and for the advertised version), infer,
and the error answers (status codes and the `{"error": ...}` body the protocol names, which the client turns into
`InferenceServerException`); and KServe's Python SDK (`kserve.InferenceRESTClient`). The SDK installs beside the
pinned torch 2.13.0+cpu and numpy (kserve 0.21.0 resolves with torch 2.13.0+cpu and numpy 2.4.6); it pins
pandas<3 and protobuf<7, which the rest of the dev extra accepts."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import tritonclient.http as tc
import tritonclient.http.aio as tc_aio
from tritonclient.utils import InferenceServerException

from tests.conftest import MNIST, start_server

KEY = "s3cret-key"
OUTPUTS = ("score", "verdict", "prediction")


def auth() -> dict:
    """The key header, a fresh dict per call: tritonclient adds its own headers to the dict it is given."""
    return {"x-api-key": KEY}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("v2-clients"), "--models", str(MNIST), "--api-key", KEY)
    yield s
    s.stop_cleanly()


@pytest.fixture(scope="module")
def triton(keyed):
    c = tc.InferenceServerClient(keyed.url.removeprefix("http://"))
    yield c
    c.close()


def _inputs(x: np.ndarray, binary: bool, dtype: str = "FP32") -> list[tc.InferInput]:
    i = tc.InferInput("input", list(x.shape), dtype)
    i.set_data_from_numpy(x, binary_data=binary)
    return [i]


def _outputs(binary: bool, names=OUTPUTS) -> list[tc.InferRequestedOutput]:
    return [tc.InferRequestedOutput(n, binary_data=binary) for n in names]


def _answer(result) -> dict:
    return {n: result.as_numpy(n).tolist() for n in OUTPUTS}


def _status(e: pytest.ExceptionInfo) -> int:
    return int(e.value.status())


def _reference(keyed, x: np.ndarray, fp32: bool = True) -> dict:
    """What the service answers a plain `application/json` infer request of `x` (httpx, no tritonclient);
    `fp32`: scores as a client reads an FP32 output."""
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    with keyed.client(headers=auth()) as c:
        r = c.post("/v2/models/mnist/infer", json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o["data"] for o in r.json()["outputs"]}
    return {**out, "score": np.float32(out["score"]).tolist()} if fp32 else out


def test_tritonclient_health_and_metadata(triton):
    assert triton.is_server_live()  # liveness needs no key
    assert triton.is_server_ready(headers=auth())
    meta = triton.get_server_metadata(headers=auth())
    assert meta["name"] == "nccr-guard" and "binary_tensor_data" in meta["extensions"]
    model = triton.get_model_metadata("mnist", headers=auth())
    assert model["versions"] == ["1"] and model["inputs"][0]["shape"] == [-1, 1, 28, 28]
    assert [o["name"] for o in model["outputs"]] == list(OUTPUTS)
    assert triton.get_model_metadata("mnist", model_version="1", headers=auth()) == model  # the advertised version
    assert triton.is_model_ready("mnist", headers=auth())
    assert triton.is_model_ready("mnist", model_version="1", headers=auth())
    assert not triton.is_model_ready("mnist", model_version="2", headers=auth())
    assert not triton.is_model_ready("nope", headers=auth())
    with pytest.raises(InferenceServerException) as e:
        triton.get_model_metadata("mnist", model_version="2", headers=auth())
    assert _status(e) == 404 and "no version '2'" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        triton.get_model_metadata("nope", headers=auth())
    assert _status(e) == 404 and "no model named 'nope'" in e.value.message()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("version", ["", "1"], ids=["unversioned", "version-1"])
def test_tritonclient_infer(keyed, triton, mnist_test, binary, version):
    """Three held-out digits in one request answer as the plain JSON request does: JSON mode sends the body with
    no Content-Type (it used to be refused 422), binary mode the raw FP32 tensor after the JSON header."""
    x, y = np.ascontiguousarray(mnist_test[0][:3]), mnist_test[1][:3]
    r = triton.infer(
        "mnist", _inputs(x, binary), outputs=_outputs(binary), model_version=version, headers=auth(), request_id="q7"
    )
    got = _answer(r)
    assert got == _reference(keyed, x)
    assert got["prediction"] == y.tolist() and set(got["verdict"]) <= {"clean", "adversarial"}
    assert r.get_response()["model_name"] == "mnist" and r.get_response()["id"] == "q7"
    # No outputs named: all three, in the protocol's default order.
    assert _answer(triton.infer("mnist", _inputs(x, binary), model_version=version, headers=auth())) == got


def test_tritonclient_aio_infer(keyed, mnist_test):
    """The asyncio client (aiohttp) declares its JSON body `application/octet-stream`; answered all the same."""
    x = np.ascontiguousarray(mnist_test[0][5:7])

    async def run() -> list[dict]:
        c = tc_aio.InferenceServerClient(keyed.url.removeprefix("http://"))
        try:
            assert await c.is_server_ready(headers=auth()) and await c.is_model_ready("mnist", "1", headers=auth())
            return [
                _answer(await c.infer("mnist", _inputs(x, b), outputs=_outputs(b), headers=auth()))
                for b in (False, True)
            ]
        finally:
            await c.close()

    as_json, as_binary = asyncio.run(run())
    assert as_json == as_binary == _reference(keyed, x)


@pytest.mark.parametrize(
    "content_type", [None, "application/json", "application/octet-stream", "text/plain", "application/json; x=1"]
)
def test_json_body_whatever_its_content_type(keyed, mnist_test, content_type):
    """As Triton: without the binary header the body is JSON, whatever the Content-Type says."""
    x = np.ascontiguousarray(mnist_test[0][:2])
    body = {"inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}]}
    headers = {**auth(), **({"content-type": content_type} if content_type else {})}
    with keyed.client() as c:
        for path in ("/v2/models/mnist/infer", "/v2/models/mnist/versions/1/infer"):
            req = c.build_request("POST", path, content=json.dumps(body).encode(), headers=headers)
            assert req.headers.get("content-type") == content_type  # httpx declares none for raw bytes
            r = c.send(req)
            assert r.status_code == 200, r.text
            assert {o["name"]: o["data"] for o in r.json()["outputs"]} == _reference(keyed, x, fp32=False)
        # Not JSON at all, declared octet-stream: the client's error, in the protocol's error body.
        r = c.post("/v2/models/mnist/infer", content=b"\x00\x01not json", headers={**headers, "content-type": "x/y"})
        assert r.status_code == 422 and set(r.json()) == {"error"}


def test_kserve_sdk_rest_client(keyed, mnist_test):
    """KServe's Python SDK (`kserve.InferenceRESTClient`, v2 protocol), which sends a JSON body as
    `application/json` and a binary one as `application/octet-stream` with the binary header: health, model ready,
    infer in both modes, and an error as the SDK raises it."""
    try:
        import httpx
        from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    except ImportError as e:  # the dev extra installs it
        pytest.fail(f"the KServe SDK is not installed ({e}): make install")
    x = np.ascontiguousarray(mnist_test[0][10:13])

    async def run() -> list[dict]:
        async with InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30)) as c:
            assert await c.is_server_live(keyed.url) and await c.is_server_ready(keyed.url)
            assert await c.is_model_ready(keyed.url, "mnist", headers=auth())
            assert not await c.is_model_ready(keyed.url, "mnist")  # no key: 401, not ready
            answers = []
            for binary in (False, True):
                tensor = InferInput("input", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x, binary_data=binary)
                r = await c.infer(keyed.url, InferRequest("mnist", [tensor], request_id="k1"), "mnist", auth())
                assert r.id == "k1" and r.model_name == "mnist"
                answers.append({o.name: o.as_numpy().tolist() for o in r.outputs})
            with pytest.raises(httpx.HTTPStatusError) as e:
                await c.infer(keyed.url, InferRequest("nope", [tensor]), "nope", auth())
            assert e.value.response.status_code == 404 and "no model named 'nope'" in str(e.value)
            return answers

    as_json, as_binary = asyncio.run(run())
    reference = _reference(keyed, x)
    verdicts = [v.decode() if isinstance(v, bytes) else v for v in as_json["verdict"]]
    assert {**as_json, "verdict": verdicts} == reference and as_binary == as_json


def test_tritonclient_errors(triton, mnist_test):
    x = np.ascontiguousarray(mnist_test[0][:1])
    for binary in (False, True):
        with pytest.raises(InferenceServerException) as e:  # wrong shape
            triton.infer("mnist", _inputs(np.zeros((1, 28, 27), np.float32), binary), headers=auth())
        assert _status(e) == 400 and "does not match" in e.value.message()
        with pytest.raises(InferenceServerException) as e:  # wrong datatype
            triton.infer("mnist", _inputs(x.astype(np.float64), binary, "FP64"), headers=auth())
        assert _status(e) == 400 and "FP32" in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            triton.infer("nope", _inputs(x, binary), headers=auth())
        assert _status(e) == 404
        with pytest.raises(InferenceServerException) as e:
            triton.infer("mnist", _inputs(x, binary), model_version="7", headers=auth())
        assert _status(e) == 404 and "no version '7'" in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            triton.infer("mnist", _inputs(x, binary), outputs=_outputs(binary, ["logits"]), headers=auth())
        assert _status(e) == 400 and "unknown output 'logits'" in e.value.message()
        with pytest.raises(InferenceServerException) as e:  # more inputs than one request may carry
            triton.infer("mnist", _inputs(np.zeros((65, 1, 28, 28), np.float32), binary), headers=auth())
        assert _status(e) == 413
        with pytest.raises(InferenceServerException) as e:  # no key
            triton.infer("mnist", _inputs(x, binary))
        assert _status(e) == 401 and "API key" in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            triton.infer("mnist", _inputs(x, binary), headers={"authorization": "Bearer wrong"})
        assert _status(e) == 401
    # A bearer token is as good as X-API-Key.
    assert triton.infer("mnist", _inputs(x, True), headers={"authorization": f"Bearer {KEY}"}).as_numpy("score").shape
    assert triton.is_server_ready()  # health needs no key (--open-health, the default)
    assert not triton.is_model_ready("mnist")  # model calls do
