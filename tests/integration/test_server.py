"""The HTTP API against a real `nccr-guard serve` on 127.0.0.1."""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest

from tests.conftest import MNIST, request_parts, start_server

FIELDS = {"model", "modality", "verdict", "score", "threshold", "p_value", "ood", "prediction", "passes", "timings_ms"}


def assert_healthy(c) -> None:
    assert c.get("/v2/health/ready").json() == {"ready": True}


def test_detect_png_multipart_and_raw(server, digit_pngs):
    path, label = digit_pngs[1]
    with server.client() as c:
        r = c.post("/v1/detect", files={"file": (path.name, path.read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == FIELDS and body["model"] == "mnist" and body["modality"] == "image"
        assert body["prediction"]["index"] == label and body["verdict"] in ("clean", "adversarial")
        assert set(body["timings_ms"]) == {"queue", "compute", "total"} and 0 < body["p_value"] <= 1
        raw = c.post("/v1/detect", content=path.read_bytes(), headers={"content-type": "image/png"})
        assert raw.status_code == 200 and raw.json()["score"] == body["score"]
        assert r.headers["x-request-id"]
        app_ms = float(r.headers["server-timing"].removeprefix("app;dur="))  # the app's own time, within the total
        assert body["timings_ms"]["total"] <= app_ms < 10_000


def test_blank_and_noise_uploads_are_flagged_out_of_distribution(server, tmp_path, digit_pngs):
    """A blank page, a grey square and uniform noise are not digits: the answer says `ood`; a held-out digit
    is not flagged (issue 35, item 3)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = {
        "blank": np.zeros((28, 28), np.uint8),
        "grey": np.full((28, 28), 128, np.uint8),
        "noise": rng.integers(0, 256, (28, 28), dtype=np.uint8),
    }
    with server.client() as c:
        for name, a in images.items():
            Image.fromarray(a).save(tmp_path / f"{name}.png")
            r = c.post("/v1/detect", files={"file": ("x.png", (tmp_path / f"{name}.png").read_bytes(), "image/png")})
            assert r.status_code == 200 and r.json()["ood"] is True, (name, r.text)
        path, _ = digit_pngs[2]
        r = c.post("/v1/detect", files={"file": (path.name, path.read_bytes(), "image/png")})
        assert r.json()["ood"] is False


def _without_timings(body):
    """A JSON answer without its `timings_ms` (which differ between any two requests), at any depth."""
    if isinstance(body, dict):
        return {k: _without_timings(v) for k, v in body.items() if k != "timings_ms"}
    if isinstance(body, list):
        return [_without_timings(v) for v in body]
    return body


def test_direct_routes_answer_as_the_fastapi_routes(server, tmp_path, digit_pngs, mnist_test):
    """POST /v1/detect, /v1/detect/batch and KServe v2 infer are served beside FastAPI's routing (DirectRoutes,
    the default); with --no-direct-routes the FastAPI routes serve them. Both answer alike: status, body (but for
    timings), the headers errors carry, and what the metrics count, for good requests and each kind of bad one
    (v2 headers that fail validation go from the direct path to the FastAPI route, body and all). Behind a proxy
    that strips a path prefix (--root-path /guard) the direct routes match as FastAPI's router does (without the
    prefix), and the docs link through it."""
    png = digit_pngs[3][0].read_bytes()
    tensors, binary = _binary_v2(np.ascontiguousarray(mnist_test[0][:3]))
    cut = int(binary["inference-header-content-length"])
    head = json.loads(tensors[:cut])

    def v2(header: dict | bytes, tail: bytes = tensors[cut:], **more) -> dict:
        h = header if isinstance(header, bytes) else json.dumps(header).encode()
        return {"content": h + tail, "headers": {**binary, "inference-header-content-length": str(len(h)), **more}}

    infer, wrong_shape = "/v2/models/mnist/infer", {"inputs": [{**head["inputs"][0], "shape": [3, 28, 28]}]}
    cases = [
        ("/v1/detect", {"content": png, "headers": {"content-type": "image/png"}}),
        ("/v1/detect", {"files": {"file": ("d.png", png, "image/png")}}),
        ("/v1/detect", {"files": [("file", ("a.png", png, "image/png")), ("file", ("b.png", png, "image/png"))]}),
        ("/v1/detect", {"content": png[:70], "headers": {"content-type": "image/png"}}),
        ("/v1/detect", {"content": b"", "headers": {"content-type": "image/png"}}),
        ("/v1/detect", {"content": b"hello\n" * 20, "headers": {"content-type": "text/plain"}}),
        ("/v1/detect", {"content": b"{}", "headers": {"content-type": "application/json"}}),
        ("/v1/detect", {"content": png, "headers": {"content-type": "image/png"}, "params": {"model": "nope"}}),
        ("/v1/detect/batch", {"files": [("file", ("a.png", png, "image/png")), ("file", ("b.png", png[:70]))]}),
        ("/v1/detect/batch", {"content": png, "headers": {"content-type": "image/png"}}),
        ("/v1/detect/batch", {"content": b"{}", "headers": {"content-type": "application/json"}}),
        (infer, v2({**head, "id": "r1"})),
        (infer, v2(head, authorization="Bearer wrong")),  # no key configured: ignored, as on the route
        (infer, v2(b"{not json")),  # to the FastAPI route: its 422
        (infer, v2({"inputs": "x"})),  # fails validation: the route's 422
        (infer, v2(wrong_shape)),  # valid, refused by the work itself: 400
        (infer, v2(head, tail=tensors[cut:-4])),  # tensor cut short: 400
        (infer, v2(head, **{"inference-header-content-length": "99999"})),
        (
            infer,
            {
                "json": {
                    "inputs": [{**head["inputs"][0], "shape": [1, 1, 28, 28], "parameters": None, "data": [0.5] * 784}]
                }
            },
        ),
        ("/v2/models/nope/infer", v2(head)),
    ]
    routed = start_server(tmp_path, "--no-direct-routes")
    prefixed = start_server(tmp_path, "--root-path", "/guard")
    try:
        answers = []
        for s in (server, routed, prefixed):
            with s.client() as c:
                before = c.get("/metrics").text
                got = []
                for path, case in cases:
                    r = c.post(path, **case)
                    kept = {h: r.headers.get(h) for h in ("content-type", "retry-after", "www-authenticate")}
                    got.append((r.status_code, _without_timings(r.json()), kept))
                after = c.get("/metrics").text
            counted = {}
            for text, sign in ((before, -1), (after, 1)):
                for m in re.finditer(r"^(nccr_guard_(?:requests|rejections)_total\{.*\}) (\S+)$", text, re.M):
                    if "/metrics" not in m.group(1):
                        counted[m.group(1)] = counted.get(m.group(1), 0) + sign * float(m.group(2))
            answers.append((got, {k: v for k, v in counted.items() if v}))
        with prefixed.client() as c:
            assert "'/guard/openapi.json'" in c.get("/docs").text
            assert c.get("/openapi.json").json()["servers"] == [{"url": "/guard"}]
    finally:
        routed.stop()
        prefixed.stop_cleanly()
    (direct, direct_counts), (fastapi, fastapi_counts), behind_proxy = answers
    assert behind_proxy == answers[0]
    logged = [json.loads(x)["path"] for x in prefixed.log.read_text().splitlines() if '"path": "/guard/v' in x]
    assert logged.count("/guard/v1/detect") == 8 and logged.count("/guard/v2/models/mnist/infer") == 8, logged
    statuses = [a[0] for a in direct]
    assert statuses[:11] == [200, 200, 400, 400, 400, 415, 415, 404, 200, 200, 415], statuses
    assert statuses[11:] == [200, 200, 422, 422, 400, 400, 400, 200, 404], statuses
    assert direct[11][1]["id"] == "r1" and len(direct[11][1]["outputs"][0]["data"]) == 3
    assert direct == fastapi
    assert direct_counts == fastapi_counts, (direct_counts, fastapi_counts)
    for endpoint in ("/v1/detect", "/v1/detect/batch", "/v2/models/{name}/infer"):
        assert any(f'endpoint="{endpoint}"' in k for k in direct_counts), direct_counts


def _access_line(s, request_id: str) -> dict:
    deadline, mine = time.monotonic() + 5, []
    while not mine and time.monotonic() < deadline:  # written by a background thread
        mine = [json.loads(x) for x in s.log.read_text().splitlines() if f'"request_id": "{request_id}"' in x]
        time.sleep(0.05)
    assert len(mine) == 1, mine
    return mine[0]


def test_access_log_has_one_json_line_per_request(server, digit_pngs):
    path, _ = digit_pngs[2]
    with server.client() as c:
        r = c.post(
            "/v1/detect", content=path.read_bytes(), headers={"content-type": "image/png", "x-request-id": "al-1"}
        )
        proxied = {"x-request-id": "al-2", "x-forwarded-for": "203.0.113.7"}
        assert c.get("/v1/models", headers=proxied).status_code == 200
    assert r.status_code == 200 and r.headers["x-request-id"] == "al-1"
    line = _access_line(server, "al-1")
    assert (line["method"], line["path"], line["status"], line["model"]) == ("POST", "/v1/detect", 200, "mnist")
    assert line["verdict"] == r.json()["verdict"] and line["upload"]["bytes"] == len(path.read_bytes())
    assert 0 < line["ms"] < 10_000
    assert line["client"] == "127.0.0.1"
    assert _access_line(server, "al-2")["client"] == "203.0.113.7"  # loopback is a trusted proxy by default


def test_forwarded_for_is_believed_only_from_trusted_proxies(tmp_path):
    """Who sent an input flagged adversarial is in the access log; a client that is not a trusted proxy
    (--forwarded-allow-ips) cannot put another address there. Plain-text service logs keep the JSON access log."""
    s = start_server(tmp_path, "--forwarded-allow-ips", "192.0.2.1", "--no-log-json", "--models", str(MNIST))
    try:
        with s.client() as c:
            assert c.get("/v1/models", headers={"x-request-id": "fw-1", "x-forwarded-for": "203.0.113.7"}).is_success
    finally:
        s.stop_cleanly()
    assert _access_line(s, "fw-1")["client"] == "127.0.0.1"
    assert " INFO nccr_guard: " in s.log.read_text()  # the service's own lines, as plain text


def test_no_access_log_writes_no_request_lines(tmp_path, digit_pngs):
    s = start_server(tmp_path, "--no-access-log", "--models", str(MNIST))
    try:
        with s.client() as c:
            r = c.post("/v1/detect", content=digit_pngs[0][0].read_bytes(), headers={"x-request-id": "quiet-1"})
            assert r.status_code == 200 and c.get("/v1/models").is_success
    finally:
        s.stop_cleanly()  # a written line would be out by now: the writer flushes at exit
    text = s.log.read_text()
    assert "Application startup complete" in text and "request_id" not in text


def _dropped_metric(c) -> float:
    m = re.search(r"^nccr_guard_access_log_dropped_total (\S+)$", c.get("/metrics").text, re.M)
    assert m, "no access-log drop counter"
    return float(m.group(1))


def test_a_stalled_stdout_drops_access_lines_and_counts_them(tmp_path):
    """A log shipper that stops reading: the server goes on answering, holds at most --access-log-max-lines
    lines and counts what it dropped in a metric; once stdout drains, new lines come through again."""
    s = start_server(tmp_path, "--access-log-max-lines", "50", "--models", str(MNIST), stdout_pipe=True)
    try:
        with s.client() as c:
            assert _dropped_metric(c) == 0
            for _ in range(1500):  # ~1,500 lines of ~250 bytes: far more than the pipe (64 KiB) and 50 lines hold
                assert c.get("/v1/models").status_code == 200
            deadline = time.monotonic() + 5
            while (dropped := _dropped_metric(c)) == 0 and time.monotonic() < deadline:
                time.sleep(0.1)  # sampled every 0.1 s
            assert dropped >= 1500 - 64 * 1024 // 200 - 50 - 100, dropped
            lines: list[str] = []
            reader = threading.Thread(target=lambda: lines.extend(s.proc.stdout.read().decode().splitlines()))
            reader.start()  # the shipper reads again
            time.sleep(0.3)  # the listener writes what was queued
            assert c.get("/v1/models", headers={"x-request-id": "after-stall"}).status_code == 200
    finally:
        s.stop_cleanly()
    reader.join(10)
    assert any('"request_id": "after-stall"' in x for x in lines[-5:]), lines[-5:]


@pytest.mark.parametrize(
    ("name", "make", "status"),
    [
        ("corrupt png", lambda png: png[:70], 400),
        ("empty body", lambda png: b"", 400),
        ("text file", lambda png: b"hello, this is text\n" * 10, 415),
        ("20 MB upload", lambda png: png + b"\0" * (20 * 1024 * 1024), 413),
    ],
)
def test_bad_uploads_get_clear_4xx(server, digit_pngs, name, make, status):
    data = make(digit_pngs[0][0].read_bytes())
    with server.client() as c:
        r = c.post("/v1/detect", files={"file": ("x.png", data, "image/png")})
        assert r.status_code == status, (name, r.text)
        assert isinstance(r.json()["error"], str) and r.json()["error"]
        assert_healthy(c)


def test_json_where_upload_expected(server):
    with server.client() as c:
        r = c.post("/v1/detect", json={"image": [1, 2, 3]})
        assert r.status_code == 415 and "upload" in r.json()["error"]


def test_batch_endpoint_mixes_results_and_errors(server, digit_pngs):
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p, _ in digit_pngs[:3]]
    files.append(("file", ("bad.png", b"\x89PNG\r\n\x1a\nbroken", "image/png")))
    with server.client() as c:
        r = c.post("/v1/detect/batch", files=files)
    assert r.status_code == 200
    res = r.json()["results"]
    assert [x["status"] for x in res] == [200, 200, 200, 400]
    assert [x["result"]["prediction"]["index"] for x in res[:3]] == [lbl for _, lbl in digit_pngs[:3]]


def test_models_endpoints(server):
    with server.client() as c:
        models = c.get("/v1/models").json()
        assert [m["name"] for m in models] == ["mnist", "photo", "speaker"]
        m = c.get("/v1/models/mnist").json()
        assert m["backend"] in ("torch", "onnx") and m["device"] == "cpu" and m["variant"] == "nccr-v4"
        assert m["calibration"]["target_fpr"] == 0.05 and m["passes"] > 1 and m["robustness_nccr"] > 0
        assert m["robustness_measure"] == "margin[logits/all]@gaussian:0.1/mean"
        s = c.get("/v1/models/speaker").json()
        assert s["backend"] == "torch" and s["variant"] == "nccr-audio-v2" and s["passes"] == 18
        assert m["cuda_graphs"] is False and s["cuda_graphs"] is False  # the CPU never captures
        assert m["fused"] is False and s["fused"] is False  # nccr-v4's weighted sum has no one-graph verdict
        assert c.get("/v1/models/nope").status_code == 404


def test_kserve_v2_protocol(server, mnist_test):
    x, y = mnist_test
    with server.client() as c:
        assert c.get("/v2").json()["name"] == "nccr-guard"
        assert c.get("/v2/health/live").json() == {"live": True}
        meta = c.get("/v2/models/mnist").json()
        assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}
        assert c.get("/v2/models/mnist/ready").json()["ready"] is True
        req = {
            "id": "r1",
            "inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": x[:2].ravel().tolist()}],
        }
        r = c.post("/v2/models/mnist/infer", json=req)
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
        assert r.json()["model_name"] == "mnist" and r.json()["id"] == "r1"
        assert out["prediction"]["data"] == y[:2].tolist() and out["score"]["shape"] == [2]
        assert out["verdict"]["datatype"] == "BYTES" and set(out["verdict"]["data"]) <= {"clean", "adversarial"}


def _binary_v2(x: np.ndarray, size: int | None = None, outputs: list[str] | None = None) -> tuple[bytes, dict]:
    """A binary-extension body: the JSON header, then the raw FP32 tensor."""
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes if size is None else size},
                }
            ],
            **({"outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outputs]} if outputs else {}),
        }
    ).encode()
    headers = {
        "inference-header-content-length": str(len(head)),
        "content-type": "application/octet-stream",
    }
    return head + x.astype("<f4").tobytes(), headers


def test_a_full_queue_refuses_the_inputs_beyond_it_and_counts_them(tmp_path, digit_pngs, mnist_test):
    """--max-queue 4 and nothing else queued: of a six-image batch the first four are scored and the last two
    refused 503 inside the 200 answer (not decoded), and both count as queue_full rejections. A KServe v2
    request succeeds or fails whole: five inputs cannot ever fit a queue of four (413)."""
    s = start_server(tmp_path, "--models", str(MNIST), "--max-queue", "4")
    try:
        files = [("file", (p.name, p.read_bytes(), "image/png")) for p, _ in digit_pngs[:6]]
        with s.client() as c:
            r = c.post("/v1/detect/batch", files=files)
            assert r.status_code == 200
            statuses = [item.get("status", 200) if item.get("error") else 200 for item in r.json()["results"]]
            assert statuses == [200, 200, 200, 200, 503, 503], r.json()
            text = c.get("/metrics").text
            assert re.search(r'^nccr_guard_rejections_total\{reason="queue_full"\} 2\.0$', text, re.M)
            verdicts = sum(map(float, re.findall(r"^nccr_guard_verdicts_total\{[^}]*\} (\S+)$", text, re.M)))
            assert verdicts == 4  # the refused two were never scored
            body, headers = _binary_v2(mnist_test[0][:5])
            too_many = c.post("/v2/models/mnist/infer", content=body, headers=headers)
            assert too_many.status_code == 413 and "queue of 4" in too_many.json()["error"]
            body, headers = _binary_v2(mnist_test[0][:4])
            assert c.post("/v2/models/mnist/infer", content=body, headers=headers).status_code == 200
            # Queue places are held from admission until the parts are submitted; those of inputs that never
            # get there (PNGs cut short: routed as images, then fail to decode) come back. Were they kept, the
            # queue of four would be full after the second of these requests.
            cut = [
                ("file", (f"cut{i}.png", p.read_bytes()[:80], "image/png")) for i, (p, _) in enumerate(digit_pngs[:2])
            ]
            for _ in range(3):
                r = c.post("/v1/detect/batch", files=files[:2] + cut)
                statuses = [item.get("status", 200) if item.get("error") else 200 for item in r.json()["results"]]
                assert statuses[:2] == [200, 200] and 400 <= min(statuses[2:]) < 500, r.json()
            r = c.post("/v1/detect/batch", files=files[:4])
            assert all(item.get("result") for item in r.json()["results"]), r.json()
            assert c.post("/v2/models/mnist/infer", content=body, headers=headers).status_code == 200
    finally:
        s.stop()


def test_kserve_v2_answers_the_outputs_asked_for(server, mnist_test):
    """A request that names outputs gets those, in its order (binary tensors on the direct route, JSON values
    through FastAPI's); an unknown name is a 400 that lists the model's outputs."""
    x = np.ascontiguousarray(mnist_test[0][:3], dtype=np.float32)
    with server.client() as c:
        body, headers = _binary_v2(x)
        everything = c.post("/v2/models/mnist/infer", content=body, headers=headers).json()
        full = {o["name"]: o for o in everything["outputs"]}
        assert list(full) == ["score", "verdict", "prediction"]
        body, headers = _binary_v2(x, outputs=["prediction", "score"])
        as_json = {
            "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            "outputs": [{"name": "prediction"}, {"name": "score"}],
        }
        for r in (
            c.post("/v2/models/mnist/infer", content=body, headers=headers),
            c.post("/v2/models/mnist/infer", json=as_json),
        ):
            assert r.status_code == 200, r.text
            assert r.json()["outputs"] == [full["prediction"], full["score"]]
        body, headers = _binary_v2(x, outputs=["score", "logits"])
        for r in (
            c.post("/v2/models/mnist/infer", content=body, headers=headers),
            c.post("/v2/models/mnist/infer", json={**as_json, "outputs": [{"name": "logits"}]}),
        ):
            assert r.status_code == 400 and "logits" in r.json()["error"] and "verdict" in r.json()["error"], r.text


def test_kserve_v2_binary_tensors_score_like_json(server, mnist_test):
    x = np.ascontiguousarray(mnist_test[0][:5], dtype=np.float32)
    with server.client() as c:
        as_json = c.post(
            "/v2/models/mnist/infer",
            json={
                "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
            },
        )
        body, headers = _binary_v2(x)
        as_binary = c.post("/v2/models/mnist/infer", content=body, headers=headers)
        assert as_json.status_code == as_binary.status_code == 200, as_binary.text
        assert as_binary.json()["outputs"] == as_json.json()["outputs"]
        assert as_binary.json()["outputs"][2]["data"] == mnist_test[1][:5].tolist()
        assert "binary_tensor_data" in c.get("/v2").json()["extensions"]
        for bad_body, bad_headers, needle in (
            (*_binary_v2(x, size=x.nbytes - 4), "binary_data_size"),  # declared size is not the tensor's
            (body[:-4], headers, "binary_data_size"),  # tensor cut short
            (body, {**headers, "inference-header-content-length": "999999"}, "length"),
        ):
            r = c.post("/v2/models/mnist/infer", content=bad_body, headers=bad_headers)
            assert r.status_code == 400 and needle in r.json()["error"], r.text
        # A JSON request that claims binary data it does not carry.
        head = json.loads(body[: int(headers["inference-header-content-length"])])
        r = c.post("/v2/models/mnist/infer", json=head)
        assert r.status_code == 400 and "header" in r.json()["error"], r.text


def _sample(text: str, name: str) -> float:
    """Sum of a metric's samples (every label set) in an exposition."""
    return sum(map(float, re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)))


def test_a_many_input_request_goes_to_the_batcher_in_parts(server, mnist_test):
    """20 inputs of one KServe v2 request reach the batcher in at most one part per batch worker, each a whole
    number of forwards (2 MNIST inputs of 78 rows at the CPU default of twice an input's rows) but the last: with
    two workers (two cores) two queue entries of 10 inputs, not one of 20, and each input still gets its own
    verdict, the same as when sent alone."""
    x = np.ascontiguousarray(mnist_test[0][:20], dtype=np.float32)
    with server.client() as c:
        card = c.get("/v1/models/mnist").json()
        parts = request_parts(card, 20)
        before = c.get("/metrics").text
        body, headers = _binary_v2(x)
        r = c.post("/v2/models/mnist/infer", content=body, headers=headers)
        assert r.status_code == 200, r.text
        after = c.get("/metrics").text
        alone = [c.post("/v2/models/mnist/infer", content=b, headers=h).json() for b, h in map(_binary_v2, x[::9])]

    def delta(name: str) -> float:
        return _sample(after, name) - _sample(before, name)

    assert delta("nccr_guard_queue_wait_seconds_count") == len(parts)
    assert card["passes"] == 78 and card["calibration"]["batching"]["max_rows"] == 156
    assert card["calibration"]["batching"]["workers"] != 2 or parts == [10, 10]  # two cores, as on CI
    assert delta("nccr_guard_batch_requests_sum") == 20  # inputs per forward still count inputs
    assert delta("nccr_guard_verdicts_total") == 20
    outputs = r.json()["outputs"]
    assert outputs[2]["data"] == mnist_test[1][:20].tolist()
    for i, one in zip((0, 9, 18), alone, strict=True):
        assert [o["data"][0] for o in one["outputs"]] == [o["data"][i] for o in outputs]


@pytest.mark.parametrize(
    ("tensor", "needle"),
    [
        ({"name": "input", "shape": [1, 28, 28], "datatype": "INT8", "data": [0] * 784}, "FP32"),
        ({"name": "input", "shape": [1, 27, 28], "datatype": "FP32", "data": [0.0] * 756}, "shape"),
        ({"name": "input", "shape": [1, 28, 28], "datatype": "FP32", "data": [0.0] * 10}, "values"),
        ({"name": "input", "shape": [1, 28, 28], "datatype": "FP32", "data": ["NaN"] + [0.0] * 783}, "NaN"),
    ],
)
def test_kserve_v2_errors(server, tensor, needle):
    with server.client() as c:
        r = c.post("/v2/models/mnist/infer", json={"inputs": [tensor]})
        assert r.status_code == 400 and needle in r.json()["error"], r.text
        assert c.post("/v2/models/nope/infer", json={"inputs": [tensor]}).status_code == 404
        bad = c.post("/v2/models/mnist/infer", json={"inputs": "nope"})
        assert bad.status_code == 422 and "error" in bad.json()


def test_metrics_exposition(server, digit_pngs):
    with server.client() as c:
        c.post("/v1/detect", files={"file": ("a.png", digit_pngs[2][0].read_bytes(), "image/png")})
        text = c.get("/metrics").text
    for name in (
        "nccr_guard_requests_total",
        "nccr_guard_request_duration_seconds_bucket",
        "nccr_guard_queue_wait_seconds_bucket",
        "nccr_guard_compute_seconds_bucket",
        "nccr_guard_batch_requests_bucket",
        "nccr_guard_batch_rows_bucket",
        "nccr_guard_queue_depth",
        "nccr_guard_in_flight_requests",
        "nccr_guard_verdicts_total",
        "nccr_guard_score_bucket",
        "nccr_guard_rejections_total",
        "nccr_guard_model_info",
        "nccr_guard_event_loop_lag_seconds_bucket",
        "nccr_guard_gc_pause_seconds_bucket",
        "nccr_guard_connections_rebalanced_total",
    ):
        assert name in text, name
    assert re.search(
        r'nccr_guard_model_info\{backend="onnx",device="cpu",k="12",modality="image",model="mnist",'
        r'variant="nccr-v4"\} 1.0',
        text,
    )


def test_api_key(tmp_path, digit_pngs):
    s = start_server(tmp_path, env={"NCCR_GUARD_API_KEY": "s3cret"})
    try:
        png = digit_pngs[0][0].read_bytes()
        with s.client() as c:
            assert c.post("/v1/detect", content=png, headers={"content-type": "image/png"}).status_code == 401
            wrong = c.post("/v1/detect", content=png, headers={"content-type": "image/png", "x-api-key": "nope"})
            assert wrong.status_code == 401 and wrong.json() == {"error": "missing or wrong API key"}
            ok = c.post(
                "/v1/detect", content=png, headers={"content-type": "image/png", "authorization": "Bearer s3cret"}
            )
            assert ok.status_code == 200
            files = {"file": ("d.png", png, "image/png")}  # the other direct routes check the key alike
            assert c.post("/v1/detect/batch", files=files).status_code == 401
            assert c.post("/v1/detect/batch", files=files, headers={"x-api-key": "s3cret"}).status_code == 200
            body, headers = _binary_v2(np.zeros((1, 1, 28, 28), np.float32))
            refused = c.post("/v2/models/mnist/infer", content=body, headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            keyed = c.post("/v2/models/mnist/infer", content=body, headers={**headers, "x-api-key": "s3cret"})
            assert keyed.status_code == 200
            assert c.get("/v1/models", headers={"x-api-key": "s3cret"}).status_code == 200
            assert c.get("/v1/models").status_code == 401
            assert c.get("/v2/health/ready").status_code == 200 and c.get("/metrics").status_code == 200
            assert 'nccr_guard_rejections_total{reason="unauthorized"} 5.0' in c.get("/metrics").text
    finally:
        s.stop_cleanly()


def test_openapi_lists_the_api(server):
    with server.client() as c:
        paths = c.get("/openapi.json").json()["paths"]
    for p in ("/v1/detect", "/v1/detect/batch", "/v1/models", "/v1/guard", "/v2/models/{name}/infer", "/metrics"):
        assert p in paths
