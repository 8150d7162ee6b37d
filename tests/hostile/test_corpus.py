"""Every hostile or odd upload gets its expected answer from a real server, never a 5xx, and the server stays
healthy after each."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.hostile.corpus import CASES, Case, rss_mb, send


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_upload(server, case: Case):
    with server.client() as c:
        r = send(c, case)
        assert r.status_code == case.expected, (case.name, r.status_code, r.text[:300])
        if r.status_code != 200:
            assert isinstance(r.json()["error"], str) and len(r.json()["error"]) > 5
        elif case.path.startswith("/v1"):
            assert r.json()["verdict"] in ("clean", "adversarial")
        else:
            assert r.json()["outputs"][1]["data"][0] in ("clean", "adversarial")
        assert c.get("/v2/health/ready").status_code == 200


UPLOADS = [c for c in CASES if c.path == "/v1/detect"]


@pytest.mark.parametrize("case", UPLOADS, ids=[c.name for c in UPLOADS])
def test_hostile_upload_to_explain(server, case: Case):
    """POST /v1/explain reads an upload as /v1/detect does: the same answer for every case, never a 5xx, and an
    explanation beside each verdict (images with their thumbnails)."""
    with server.client() as c:
        r = send(c, replace(case, path="/v1/explain"))
        assert r.status_code == case.expected, (case.name, r.status_code, r.text[:300])
        if r.status_code != 200:
            assert isinstance(r.json()["error"], str) and len(r.json()["error"]) > 5
        else:
            got = r.json()
            assert got["detection"]["verdict"] in ("clean", "adversarial")
            assert sum(got["explanation"]["clean"]["counts"]) == got["explanation"]["clean"]["n"]
            assert bool(got["explanation"]["thumbnails"]) == (got["detection"]["modality"] == "image")
        assert c.get("/v2/health/ready").status_code == 200


def test_malformed_multipart(server):
    with server.client() as c:
        r = c.post(
            "/v1/detect",
            content=b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc',
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        )
        assert 400 <= r.status_code < 500 and r.json()["error"]
        r = c.post("/v1/detect", content=b"junk", headers={"content-type": "multipart/form-data"})
        assert 400 <= r.status_code < 500 and r.json()["error"]


def test_memory_returns_to_baseline_after_the_corpus(server):
    """Three more passes over every case: resident memory must not keep growing (allocator noise allowed)."""
    with server.client() as c:
        for case in CASES:
            send(c, case)
        warm = rss_mb(server.proc.pid)
        for _ in range(3):
            for case in CASES:
                send(c, case)
        after = rss_mb(server.proc.pid)
    assert after < warm * 1.05 + 10, (warm, after)


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/", 200),
        ("/assets/app.js", 200),
        ("/docs-assets/swagger-ui-bundle.js", 200),
        ("/assets/../../../pyproject.toml", 404),
        ("/assets/%2e%2e/%2e%2e/config.py", 404),
        ("/docs-assets/..%2f..%2fcore.py", 404),
        ("/assets/", 404),
        ("/assets/nope.js", 404),
        ("/v2/models/mnist/versions/%00/ready", 404),
        ("/v2/models/mnist/versions/1", 200),
    ],
)
def test_page_and_asset_paths(server, path, expected):
    """The page's routes and static folders answer what they hold and nothing outside them, never a 5xx."""
    with server.client() as c:
        r = c.get(path)
        assert r.status_code == expected, (path, r.status_code, r.text[:200])
