"""Sidecar mode against a real upstream HTTP server: clean uploads arrive byte-identical, attacked ones do not."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import MNIST, free_port, start_server, to_png


class Upstream:
    """A stand-in production classifier that records what reaches it."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[bytes] = []
        self.headers: list[dict] = []
        self.paths: list[str] = []
        self.raw_headers: list[list[tuple[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.bodies.append(body)
                outer.headers.append({k.lower(): v for k, v in self.headers.items()})
                outer.raw_headers.append([(k.lower(), v) for k, v in self.headers.items()])
                outer.paths.append(self.path)
                out = json.dumps({"label": "from-upstream", "bytes": len(body)}).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/classify"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def attacked_pngs(tmp_path_factory, detector, mnist_test):
    """FGSM (ART) versions of held-out digits, saved as 8-bit PNGs, that still fool the model."""
    from nccr_guard.eval.attacks import art_classifier, run_attack
    from nccr_guard.inputs import decode

    x, y = mnist_test
    clf = art_classifier(detector.backend.module, (1, 28, 28), 10, (0.0, 1.0))
    adv = run_attack("fgsm", clf, x[:40])
    folder = tmp_path_factory.mktemp("adv")
    out = []
    for i, a in enumerate(adv):
        p = to_png(a, folder / f"adv_{i}.png")
        v = detector.detect([decode(p.read_bytes(), detector.manifest)])[0]
        if v.index != y[i]:
            out.append((p, v))
    assert len(out) >= 10
    return out


def test_clean_forwarded_byte_identical_adversarial_blocked(tmp_path, digit_pngs, attacked_pngs):
    up = Upstream()
    s = start_server(tmp_path, "--upstream", up.url)
    try:
        with s.client() as c:
            forwarded = 0
            for path, _ in digit_pngs[:12]:
                data = path.read_bytes()
                r = c.post("/v1/guard", content=data, headers={"content-type": "image/png", "x-request-id": "abc"})
                assert r.headers["x-nccr-verdict"] in ("clean", "adversarial")
                if r.headers["x-nccr-verdict"] == "clean":
                    forwarded += 1
                    assert r.status_code == 200 and r.json()["label"] == "from-upstream"
                    assert up.bodies[-1] == data and up.headers[-1]["content-type"] == "image/png"
                    assert up.headers[-1]["x-request-id"] == "abc"
                else:
                    assert r.status_code == 422
            assert forwarded >= 9 and len(up.bodies) == forwarded
            multipart = c.post("/v1/guard", files={"file": ("d.png", digit_pngs[1][0].read_bytes(), "image/png")})
            if multipart.headers["x-nccr-verdict"] == "clean":
                assert up.bodies[-1].startswith(b"--") and digit_pngs[1][0].read_bytes() in up.bodies[-1]
            before = len(up.bodies)
            blocked = [p for p, v in attacked_pngs if v.adversarial]
            assert len(blocked) >= 0.8 * len(attacked_pngs)
            for p in blocked:
                r = c.post("/v1/guard", content=p.read_bytes(), headers={"content-type": "image/png"})
                assert r.status_code == 422 and r.json()["verdict"] == "adversarial"
                assert r.headers["x-nccr-verdict"] == "adversarial"
            assert len(up.bodies) == before
    finally:
        s.stop()
        up.close()


def test_tag_mode_forwards_with_headers_and_upstream_failures_map(tmp_path, attacked_pngs):
    up = Upstream(status=500)
    s = start_server(tmp_path, "--upstream", up.url, "--on-adversarial", "tag")
    dead = start_server(tmp_path, "--upstream", f"http://127.0.0.1:{free_port()}/x")
    try:
        p, _ = next((p, v) for p, v in attacked_pngs if v.adversarial)
        with s.client() as c:
            r = c.post("/v1/guard", content=p.read_bytes(), headers={"content-type": "image/png"})
            assert len(up.bodies) == 1 and up.headers[0]["x-nccr-verdict"] == "adversarial"
            assert r.status_code == 502 and "upstream answered 500" in r.json()["error"]
        with dead.client() as c:
            r = c.post("/v1/guard", content=p.read_bytes(), headers={"content-type": "image/png"})
            assert r.status_code in (422, 502)
            if r.status_code == 502:
                assert "unreachable" in r.json()["error"]
    finally:
        s.stop()
        dead.stop()
        up.close()


def test_forwards_authorization_custom_headers_and_query_but_not_its_own_key(tmp_path, digit_pngs):
    """The upstream gets the client's Authorization, cookies, custom and repeated headers and the query string
    (after the upstream URL's own); never this server's key (X-API-Key, or a bearer token carrying it), nor
    hop-by-hop headers, those the Connection header names included."""
    up = Upstream()
    s = start_server(tmp_path, "--upstream", up.url + "?tenant=a", "--api-key", "sidecar-key")
    try:
        png = next(p.read_bytes() for p, label in digit_pngs[:20] if label == 1)
        with s.client() as c:
            headers = [
                ("content-type", "image/png"),
                ("x-api-key", "sidecar-key"),
                ("authorization", "Bearer upstream-token"),
                ("cookie", "session=s1"),
                ("x-custom", "one"),
                ("x-custom", "two"),
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "dropped"),
            ]
            r = c.post("/v1/guard?model=mnist&trace=on", content=png, headers=headers)
            assert "x-nccr-verdict" in r.headers, (r.status_code, r.text)
            if r.headers["x-nccr-verdict"] != "clean":
                pytest.skip("this held-out digit scored adversarial")  # the forwarding is what is tested here
            assert r.status_code == 200 and r.json()["label"] == "from-upstream"
            assert up.paths[-1] == "/classify?tenant=a&model=mnist&trace=on"
            got = up.headers[-1]
            assert got["authorization"] == "Bearer upstream-token" and got["cookie"] == "session=s1"
            assert [v for k, v in up.raw_headers[-1] if k == "x-custom"] == ["one", "two"]
            assert "x-api-key" not in got and "x-hop" not in got and got["x-nccr-verdict"] == "clean"
            assert up.bodies[-1] == png

            r = c.post(
                "/v1/guard", content=png, headers={"content-type": "image/png", "authorization": "Bearer sidecar-key"}
            )
            assert r.status_code == 200 and up.paths[-1] == "/classify?tenant=a"
            assert "authorization" not in up.headers[-1]  # the bearer token was this server's key
            assert c.post("/v1/guard", content=png, headers={"content-type": "image/png"}).status_code == 401
    finally:
        s.stop()
        up.close()


def test_forwarding_writes_no_line_of_httpx_into_the_json_log(tmp_path, digit_pngs):
    """httpx logs one INFO line per request it sends ('HTTP Request: POST ... "HTTP/1.1 200 OK"'), which the access
    log says already and which broke the JSON log's format; the server's log is JSON lines only, none of httpx."""
    up = Upstream()
    s = start_server(tmp_path, "--upstream", up.url, "--models", str(MNIST), stdout_pipe=True)
    try:
        with s.client() as c:
            for p, _ in digit_pngs[:3]:
                r = c.post("/v1/guard", content=p.read_bytes(), headers={"content-type": "image/png"})
                assert r.status_code in (200, 422)
        assert up.bodies  # at least one was forwarded
    finally:
        s.stop_cleanly()
        up.close()
    records = [json.loads(line) for line in s.log.read_text().splitlines()]  # stderr: the service log
    assert records and not [r for r in records if r["logger"].startswith(("httpx", "httpcore"))]
    assert not [r for r in records if "HTTP Request" in r["msg"]]


def test_json_bodies_are_scored_as_tensors_then_forwarded_byte_identical(tmp_path, digit_pngs, attacked_pngs):
    """A KServe v2 infer request and a row-format `{"instances": ...}` body are scored as the tensors they carry
    (the verdicts /v1/detect gives the same pixels) and forwarded unchanged when clean; one with an attacked
    digit among them is blocked; JSON the sidecar cannot read is refused, never forwarded unscored."""
    from nccr_guard.inputs import decode
    from nccr_guard.manifest import load_manifest

    manifest = load_manifest(MNIST)
    up = Upstream()
    s = start_server(tmp_path, "--upstream", up.url, "--models", str(MNIST))
    try:
        with s.client() as c:
            clean = []
            for p, _ in digit_pngs[:12]:
                d = c.post("/v1/detect", content=p.read_bytes(), headers={"content-type": "image/png"}).json()
                if d["verdict"] == "clean":
                    clean.append((decode(p.read_bytes(), manifest), d))
            assert len(clean) >= 3
            x, want = clean[0]
            v2 = {
                "inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}]
            }
            body = json.dumps(v2).encode()
            r = c.post("/v1/guard?model=mnist", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 200 and r.json()["label"] == "from-upstream", r.text
            assert r.headers["x-nccr-verdict"] == "clean" and r.headers["x-nccr-inputs"] == "1"
            assert float(r.headers["x-nccr-score"]) == pytest.approx(want["score"], abs=1e-3)
            assert up.bodies[-1] == body and up.headers[-1]["content-type"] == "application/json"
            assert up.paths[-1] == "/classify?model=mnist"

            rows = json.dumps({"instances": [xi.tolist() for xi, _ in clean[:3]]}).encode()
            r = c.post("/v1/guard", content=rows, headers={"content-type": "application/json; charset=utf-8"})
            assert r.status_code == 200 and r.headers["x-nccr-inputs"] == "3" and up.bodies[-1] == rows
            assert float(r.headers["x-nccr-score"]) == pytest.approx(max(d["score"] for _, d in clean[:3]), abs=1e-3)

            before = len(up.bodies)
            adv_path, adv = next((p, v) for p, v in attacked_pngs if v.adversarial)
            mixed = [clean[1][0].tolist(), decode(adv_path.read_bytes(), manifest).tolist()]
            r = c.post("/v1/guard", json={"instances": mixed})
            assert r.status_code == 422 and r.headers["x-nccr-verdict"] == "adversarial", r.text
            got = r.json()
            assert got["verdict"] == "adversarial" and [d["verdict"] for d in got["results"]] == [
                "clean",
                "adversarial",
            ]
            assert got["results"][1]["score"] == pytest.approx(adv.score, abs=1e-3)
            refused = {
                "neither form": (b'{"image": [1, 2, 3]}', 400, "neither"),
                "not JSON": (b"{not json", 422, "does not parse"),
                "0-255 pixels": (json.dumps({"instances": [(x * 255).tolist()]}).encode(), 400, "divide them by 255"),
                "no model's shape": (json.dumps({"instances": [[[0.5] * 10]]}).encode(), 400, "no served model"),
                "ragged": (b'{"instances": [[1, 2], [3]]}', 400, "equally shaped"),
                "two tensors": (json.dumps({"inputs": v2["inputs"] * 2}).encode(), 400, "exactly one"),
            }
            for what, (raw, status, says) in refused.items():
                r = c.post("/v1/guard", content=raw, headers={"content-type": "application/json"})
                assert r.status_code == status and says in r.json()["error"], (what, r.status_code, r.text)
            assert len(up.bodies) == before  # nothing unscored went upstream
    finally:
        s.stop_cleanly()
        up.close()
