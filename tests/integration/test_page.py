"""The try-it page at `/` and the offline API docs, in a real headless browser: Debian's chromium (`make test`'s
tool step installs it) driven by Playwright, against a real `nccr-guard serve --api-key ... --root-path /guard`
behind a small reverse proxy on 127.0.0.1 that strips the prefix, as an ingress does. Each test records every
request the browser makes and fails on any that leaves the proxy (a CDN script, a web font): the pages work
offline. Screenshots go to each test's temporary folder."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.conftest import MNIST, start_server

KEY = "page-key"
PREFIX = "/guard"
HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


def chromium() -> str:
    path = shutil.which("chromium")
    assert path, "chromium not found: `make test` installs it (Debian package chromium)"
    return path


class StripPrefixProxy:
    """A reverse proxy on loopback that serves `upstream` under PREFIX and strips it before forwarding."""

    def __init__(self, upstream: str) -> None:
        client = httpx.Client(base_url=upstream, timeout=30)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                if not self.path.startswith(PREFIX):
                    self.send_error(404, "outside the proxied prefix")
                    return
                size = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(size) if size else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                r = client.request(self.command, self.path[len(PREFIX) :] or "/", content=body, headers=headers)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in HOP:
                        self.send_header(k, v)
                self.send_header("content-length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = _forward  # noqa: N815 - http.server's names

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.client = client

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.client.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[object, StripPrefixProxy]]:
    folder = tmp_path_factory.mktemp("page")
    s = start_server(folder, "--models", str(MNIST), "--api-key", KEY, "--root-path", PREFIX, "--attack-demo")
    proxy = StripPrefixProxy(s.url)
    yield s, proxy
    proxy.close()
    s.stop_cleanly()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # Root in a container: chromium's sandbox needs user namespaces it may not have.
        b = p.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, served):
    """A fresh page whose every request is recorded; the test fails if one went anywhere but the proxy (one the
    browser itself refused under the page's Content-Security-Policy never leaves it)."""
    _, proxy = served
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    seen: list[str] = []
    page.on("request", lambda r: seen.append(r.url))
    page.on("requestfailed", lambda r: r.failure == "csp" and seen.remove(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    outside = [u for u in seen if not u.startswith((proxy.url + PREFIX, "blob:", "data:"))]
    assert not outside, f"requests beyond the server: {outside}"
    assert not errors, f"script errors: {errors}"


def _enter_key(page) -> None:
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.querySelector('#model').options.length > 1")


def test_page_scores_an_uploaded_digit(page, served, digit_pngs, tmp_path):
    """Opened as `/guard` (no trailing slash), the page asks for the key (the models call answers 401), lists
    the models once it is given, and shows for an uploaded held-out digit what POST /v1/detect answers."""
    server, proxy = served
    page.goto(f"{proxy.url}{PREFIX}")
    page.wait_for_selector("#error:not([hidden])")
    assert "401" in page.text_content("#error") and "API key" in page.text_content("#error")
    _enter_key(page)
    assert page.is_hidden("#error")
    assert [o for o in page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")] == ["", "mnist"]
    page.select_option("#model", "mnist")
    assert "nccr-v4" in page.text_content("#model-info")

    path, label = digit_pngs[7]
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#verdict[data-verdict]")
    with server.client(headers={"x-api-key": KEY}) as c:
        expected = c.post("/v1/detect", files={"file": (path.name, path.read_bytes(), "image/png")}).json()
    assert page.get_attribute("#verdict", "data-verdict") == expected["verdict"]
    assert page.text_content("#prediction").startswith(f"{expected['prediction']['label']} (class {label})")
    assert float(page.text_content("#score")) == pytest.approx(expected["score"], rel=1e-3)
    assert float(page.text_content("#threshold")) == pytest.approx(expected["threshold"], rel=1e-3)
    assert float(page.text_content("#p-value")) == pytest.approx(expected["p_value"], rel=1e-2, abs=1e-3)
    assert "ms total" in page.text_content("#timings") and " of " in page.text_content("#passes")
    if "ood" in expected:  # shown when the answer has it
        assert page.text_content("#ood") == ("yes" if expected["ood"] else "no") and page.is_visible("#ood-row")
    assert "248 standardised components of nccr-v4" in page.text_content("#components")  # from its card
    assert page.is_visible("#preview img")

    # The score on the clean calibration scores' histogram, the largest weight x z terms, the rows as thumbnails.
    with server.client(headers={"x-api-key": KEY}) as c:
        explained = c.post("/v1/explain", files={"file": (path.name, path.read_bytes(), "image/png")}).json()
    e = explained["explanation"]
    assert page.get_attribute("#dist", "data-bars") == "30" and page.locator("#dist rect.bar").count() == 30
    assert int(page.get_attribute("#dist", "data-clean")) == e["clean"]["n"] == sum(e["clean"]["counts"])
    assert float(page.get_attribute("#dist", "data-score")) == pytest.approx(expected["score"], rel=1e-3)
    assert page.locator("#dist line.thr").count() == 1 and page.locator("#dist line.score").count() == 1
    assert f"threshold {expected['threshold']:.3g}" in page.text_content("#dist")
    assert "logistic combination" in page.text_content("#contrib-note")
    names = page.eval_on_selector_all("#contribs tbody td.name code", "cs => cs.map(c => c.textContent)")
    assert names == [k["name"] for k in e["combiner"]["components"]] and len(names) == 10
    assert "the other 238" in page.text_content("#contrib-foot")
    thumbs = page.eval_on_selector_all("#thumbs figure", "fs => fs.map(f => f.dataset.perturbation)")
    assert thumbs == [t["perturbation"] for t in e["thumbnails"]] and len(thumbs) == 12
    assert thumbs[0] == "original" and {"bitdepth:1", "median:3", "gaussian:0.2", "uniform:0.1"} <= set(thumbs)
    assert page.evaluate(
        "[...document.querySelectorAll('#thumbs img')].every(i => i.complete && i.naturalWidth === 28)"
    )
    assert "12 of the 78 rows" in page.text_content("#rows-note")
    assert page.is_visible("#attack")  # the server runs with --attack-demo
    shot = tmp_path / "page-upload.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_make_it_adversarial_shows_the_pair(page, served, digit_pngs, tmp_path):
    """With --attack-demo, the button attacks the uploaded digit on the server and the page shows the clean and
    the adversarial image side by side with their verdicts, as POST /v1/attack answers them."""
    server, proxy = served
    page.goto(f"{proxy.url}{PREFIX}/")
    _enter_key(page)
    path, label = digit_pngs[3]
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#verdict[data-verdict]")
    page.click("#attack")
    page.wait_for_selector("#pair:not([hidden])", timeout=60_000)
    with server.client(headers={"x-api-key": KEY}, timeout=120) as c:
        want = c.post("/v1/attack", files={"file": (path.name, path.read_bytes(), "image/png")}).json()
    assert want["adversarial"]["verdict"] == "adversarial" and want["adversarial"]["prediction"]["index"] != label
    assert page.get_attribute("#pair-clean .verdict", "data-verdict") == want["clean"]["verdict"]
    assert page.get_attribute("#pair-adv .verdict", "data-verdict") == "adversarial"
    assert f"predicted {want['adversarial']['prediction']['label']} " in page.text_content("#pair-adv figcaption")
    assert f"predicted {label} " in page.text_content("#pair-clean figcaption")
    assert page.get_attribute("#pair-adv img", "src") == want["image"]  # the attack is seeded: the same image
    assert "PGD" in page.text_content("#pair-note") and "10 steps" in page.text_content("#pair-note")
    assert page.evaluate("[...document.querySelectorAll('#pair img')].every(i => i.complete && i.naturalWidth === 28)")
    shot = tmp_path / "page-attack.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_with_no_explain_and_no_demo_the_page_shows_the_verdict_only(browser, digit_pngs, tmp_path):
    """A server run with --no-explain and without --attack-demo: the page scores through POST /v1/detect and
    shows the verdict, without the distribution, the contributions, the thumbnails or "Make it adversarial"."""
    s = start_server(tmp_path, "--models", str(MNIST), "--no-explain")
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    try:
        page = context.new_page()
        posted: list[str] = []
        page.on("request", lambda r: r.method == "POST" and posted.append(r.url))
        page.goto(s.url + "/")
        page.wait_for_function("document.querySelector('#model').options.length > 1")
        page.set_input_files("#file", str(digit_pngs[5][0]))
        page.wait_for_selector("#verdict[data-verdict]")
        assert posted == [s.url + "/v1/detect"]
        assert page.get_attribute("#verdict", "data-verdict") in ("clean", "adversarial")
        for hidden in ("#dist-block", "#explained", "#rows-block", "#attack", "#pair"):
            assert page.is_hidden(hidden), hidden
        assert "below" not in page.text_content("#components")
        page.screenshot(path=str(tmp_path / "page-verdict-only.png"), full_page=True)
    finally:
        context.close()
        s.stop_cleanly()


def test_page_scores_a_drawn_digit(page, served, tmp_path):
    """A "1" drawn with the mouse is sent as a centred 28 x 28 PNG and scored."""
    _, proxy = served
    page.goto(f"{proxy.url}{PREFIX}/")
    _enter_key(page)
    page.click("#check-drawing")
    assert "Draw a digit first" in page.text_content("#error")
    box = page.locator("#pad").bounding_box()
    x = box["x"] + box["width"] / 2
    page.mouse.move(x, box["y"] + box["height"] * 0.15)
    page.mouse.down()
    for i in range(1, 21):
        page.mouse.move(x + i * 0.4, box["y"] + box["height"] * (0.15 + 0.035 * i))
    page.mouse.up()
    page.click("#check-drawing")
    page.wait_for_selector("#verdict[data-verdict]")
    assert page.get_attribute("#verdict", "data-verdict") in ("clean", "adversarial")
    assert page.text_content("#prediction").startswith("1 (class 1)")
    assert page.text_content("#what") == "mnist (image)"
    shot = tmp_path / "page-drawing.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_docs_and_redoc_work_offline_with_an_authorize_button(page, served, tmp_path):
    """Swagger UI and Redoc render from the package's assets (nothing from a CDN: the page fixture fails on any
    outside request); /docs has an Authorize button for the API key, and with it "Try it out" gets a 200."""
    server, proxy = served
    page.goto(f"{proxy.url}{PREFIX}/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert "nccr-guard" in page.text_content(".swagger-ui .info .title")
    page.click("button.authorize")
    page.fill(".auth-container input[type=text], .auth-container input[type=password] >> nth=0", KEY)
    page.click(".auth-container .modal-btn.authorize >> nth=0")
    page.click(".btn-done")
    op = "#operations-models-list_models_v1_models_get"
    page.click(f"{op} .opblock-summary")
    page.click(f"{op} .try-out__btn")
    page.click(f"{op} .execute")
    status = f"{op} .live-responses-table tbody .response-col_status"
    page.wait_for_selector(status)
    assert page.text_content(status).strip() == "200"
    assert '"name": "mnist"' in page.text_content(f"{op} .live-responses-table tbody .response-col_description")
    page.screenshot(path=str(tmp_path / "docs.png"))

    page.goto(f"{proxy.url}{PREFIX}/redoc")
    page.wait_for_selector("h1:has-text('nccr-guard')", timeout=30_000)
    page.screenshot(path=str(tmp_path / "redoc.png"))

    with server.client() as c:
        spec = c.get("/openapi.json").json()
        assert set(spec["components"]["securitySchemes"]) == {"apiKey", "bearer"}
        assert spec["paths"]["/v1/detect"]["post"]["security"] == [{"apiKey": []}, {"bearer": []}]
        assert "security" not in spec["paths"]["/v2/health/live"]["get"]  # always open
        html = c.get("/").text
        assert f'<base href="{PREFIX}/">' in html and "https://" not in html


def test_page_scores_an_audio_clip_and_explains_a_refused_one(browser, tmp_path):
    """A speaker server: a held-out corpus clip dropped on the page is scored by the audio model (the page shows
    what POST /v1/detect answers, with an audio player as preview); a 1 s clip, under the model's 2 s minimum,
    shows the 422 and the minimum instead of a verdict."""
    import numpy as np

    from nccr_guard.audio import encode_wav
    from nccr_guard.manifest import load_manifest
    from nccr_guard.speaker_corpus import corpus_files

    speaker = MNIST.parent / "speaker"
    files, ys = corpus_files(load_manifest(speaker).split, "test", index=np.array([4]))
    clip = tmp_path / "clip.wav"
    clip.write_bytes(files[0].read_bytes())
    s = start_server(tmp_path, "--models", str(speaker))
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    try:
        page = context.new_page()
        page.goto(s.url + "/")
        page.wait_for_function("document.querySelector('#model').options.length > 1")
        page.set_input_files("#file", str(clip))
        page.wait_for_selector("#verdict[data-verdict]")
        with s.client() as c:
            expected = c.post("/v1/detect", files={"file": ("clip.wav", clip.read_bytes(), "audio/wav")}).json()
        assert page.text_content("#what") == "speaker (audio)"
        assert page.get_attribute("#verdict", "data-verdict") == expected["verdict"]
        assert page.text_content("#prediction").startswith(expected["prediction"]["label"])
        assert float(page.text_content("#score")) == pytest.approx(expected["score"], rel=1e-3)
        assert page.is_visible("#preview audio")
        page.screenshot(path=str(tmp_path / "page-audio.png"), full_page=True)

        short = tmp_path / "short.wav"
        t = np.arange(16000) / 16000
        short.write_bytes(encode_wav((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000))
        page.set_input_files("#file", str(short))
        page.wait_for_selector("#error:not([hidden])")
        assert "422" in page.text_content("#error") and "2 s minimum" in page.text_content("#error")
        assert page.is_hidden("#result")  # the earlier clip's verdict is not left beside the refusal
    finally:
        context.close()
        s.stop_cleanly()
