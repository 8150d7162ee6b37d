"""The photo model served by default beside mnist and speaker: colour crops of its held-out test split over HTTP."""

from __future__ import annotations

import io

import numpy as np
import pytest

from tests.conftest import ROOT

PHOTO = ROOT / "models" / "photo"
# Test-split crops (position in the split: 40 per photo, in label order) of chelsea, coffee, motorcycle and
# china that the committed weights classify right and call clean (p-values 0.22-0.89), as quality-95 JPEGs too.
PICKS = (42, 96, 168, 338)


@pytest.fixture(scope="module")
def test_crops() -> list[tuple[bytes, str]]:
    """The picked held-out crops as quality-95 JPEG files, each with its photo's label."""
    from PIL import Image

    from nccr_guard.datasets import load_split
    from nccr_guard.manifest import load_manifest

    manifest = load_manifest(PHOTO)
    x, y = load_split(manifest, "test", index=np.array(PICKS))
    out = []
    for xi, yi in zip(x, y, strict=True):
        buf = io.BytesIO()
        Image.fromarray((xi.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=95)
        out.append((buf.getvalue(), manifest.labels[yi]))
    return out


def test_photo_is_a_default_model(server):
    with server.client() as c:
        cards = {m["name"]: m for m in c.get("/v1/models").json()}
    assert {"mnist", "photo", "speaker"} <= set(cards)
    assert cards["photo"]["modality"] == "image" and cards["photo"]["variant"] == "nccr-v4-c1000"


def test_colour_jpeg_crops_are_identified_with_a_verdict(server, test_crops):
    with server.client() as c:
        for data, label in test_crops:
            r = c.post("/v1/detect", files={"file": ("crop.jpg", data, "image/jpeg")}, data={"model": "photo"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == "photo" and body["prediction"]["label"] == label
            assert body["verdict"] == "clean" and 0 < body["p_value"] <= 1
        # without `model`, an image still goes to mnist, the first image model
        r = c.post("/v1/detect", files={"file": ("crop.jpg", test_crops[0][0], "image/jpeg")})
        assert r.status_code == 200 and r.json()["model"] == "mnist"
