"""Every hostile or odd upload gets its expected answer from a real server, never a 5xx, and the server stays
healthy after each."""

from __future__ import annotations

import pytest

from tests.hostile.corpus import CASES, Case


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_upload(server, case: Case):
    data = case.make()
    with server.client() as c:
        if case.multipart:
            r = c.post("/v1/detect", files={"file": ("upload", data, case.content_type)})
        else:
            r = c.post("/v1/detect", content=data, headers={"content-type": case.content_type})
        assert r.status_code == case.expected, (case.name, r.status_code, r.text[:300])
        if r.status_code != 200:
            assert isinstance(r.json()["error"], str) and len(r.json()["error"]) > 5
        else:
            assert r.json()["verdict"] in ("clean", "adversarial")
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
