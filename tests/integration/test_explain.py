"""POST /v1/explain and the opt-in POST /v1/attack (issue 37) against a real `nccr-guard serve` on loopback, with
the shipped mnist (nccr-v4, a logistic combination over 78 rows) and a copy of the photo model served as nccr-v3
(a max over 4 rows; the shipped one serves a logistic variant as mnist does)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import numpy as np
import pytest

from tests.conftest import MNIST, ROOT, Server, as_v3, start_server

PHOTO = ROOT / "models" / "photo"


def _png(uri: str) -> np.ndarray:
    from PIL import Image

    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def _without_timings(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "timings_ms"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Iterator[Server]:
    photo_v3 = as_v3(PHOTO, tmp_path_factory)
    s = start_server(tmp_path_factory.mktemp("demo"), "--models", str(MNIST), str(photo_v3), "--attack-demo")
    yield s
    s.stop_cleanly()


@pytest.fixture(scope="module")
def photo_crops() -> list[bytes]:
    """Three held-out photo crops as PNG files."""
    from PIL import Image

    from nccr_guard.datasets import load_split
    from nccr_guard.manifest import load_manifest

    x, _ = load_split(load_manifest(PHOTO), "test", index=np.array([42, 96, 168]))
    out = []
    for xi in x:
        buf = io.BytesIO()
        Image.fromarray((xi.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def test_explain_is_detect_plus_what_the_logistic_score_is_made_of(demo, digit_pngs):
    """For held-out digits: `detection` is /v1/detect's answer; the listed weight x z terms, the bias and the
    rest add up to the score; the histogram holds every clean calibration score; the thumbnails are the input
    itself, its five squeezes and one copy per noise family, as 8-bit 28 x 28 PNGs."""
    from PIL import Image

    from nccr_guard.engine.calibration import Calibration

    calib = Calibration.load(MNIST / "calibration.npz")
    with demo.client() as c:
        for path, _ in digit_pngs[:4]:
            files = {"file": (path.name, path.read_bytes(), "image/png")}
            plain = c.post("/v1/detect", files=files)
            r = c.post("/v1/explain", files=files)
            assert r.status_code == 200, r.text
            got, e = r.json()["detection"], r.json()["explanation"]
            assert _without_timings(got) == _without_timings(plain.json())
            assert set(plain.json()) == set(got)  # /v1/detect's answer is unchanged
            assert e["score"] == pytest.approx(got["score"], abs=2e-4) and e["threshold"] == got["threshold"]
            comb = e["combiner"]
            assert comb["kind"] == "logistic" and comb["n_components"] == 248 and len(comb["components"]) == 10
            terms = [k["contribution"] for k in comb["components"]]
            assert abs(terms[0]) >= abs(terms[-1])  # the largest first
            assert all(k["contribution"] == pytest.approx(k["weight"] * k["z"], abs=2e-3) for k in comb["components"])
            assert comb["bias"] + sum(terms) + comb["rest"] == pytest.approx(e["score"], abs=2e-3)
            clean = e["clean"]
            assert clean["n"] == len(calib.clean_scores) == sum(clean["counts"]) and len(clean["edges"]) == 31
            assert clean["edges"][0] <= calib.threshold <= clean["edges"][-1]
            keys = [t["perturbation"] for t in e["thumbnails"]]
            assert keys == ["original", *(f"gaussian:{s:g}" for s in (0.02, 0.05, 0.1, 0.2))] + [
                "uniform:0.1",
                "uniform:0.2",
                "bitdepth:1",
                "bitdepth:2",
                "bitdepth:3",
                "median:2",
                "median:3",
            ]
            assert e["rows"] == 78 and e["rows_as_verdict"] is True  # on the CPU, the very rows of the verdict
            assert e["thumbnails"][0]["prediction"] == got["prediction"]["label"]
            pixels = {t["perturbation"]: _png(t["image"]) for t in e["thumbnails"]}
            assert all(p.shape == (28, 28) for p in pixels.values())
            assert (pixels["original"] == np.asarray(Image.open(path))).all()  # the upload, as scored
            assert set(np.unique(pixels["bitdepth:1"])) <= {0, 255}
            assert not (pixels["gaussian:0.2"] == pixels["original"]).all()


def test_explain_marks_the_max_of_a_max_combined_variant(demo, photo_crops):
    with demo.client() as c:
        for png in photo_crops:
            r = c.post("/v1/explain?model=photo", files={"file": ("c.png", png, "image/png")})
            assert r.status_code == 200, r.text
            e = r.json()["explanation"]
            comb = e["combiner"]
            assert comb["kind"] == "max" and comb["n_components"] == 3 and len(comb["components"]) == 3
            zs = [k["z"] for k in comb["components"]]
            assert zs == sorted(zs, reverse=True) and [k["max"] for k in comb["components"]] == [True, False, False]
            assert zs[0] == pytest.approx(r.json()["detection"]["score"], abs=2e-4)
            assert [t["perturbation"] for t in e["thumbnails"]] == [
                "original",
                "bitdepth:3",
                "bitdepth:1",
                "bitdepth:2",
            ]
            assert all(_png(t["image"]).shape == (32, 32, 3) for t in e["thumbnails"])


def test_explain_refuses_what_detect_refuses(demo, digit_pngs):
    with demo.client() as c:
        assert c.post("/v1/explain", json={"image": [1]}).status_code == 415
        assert (
            c.post("/v1/explain", content=b"\x89PNG\r\n\x1a\nbroken", headers={"content-type": "image/png"}).status_code
            == 400
        )
        two = [("file", (p.name, p.read_bytes(), "image/png")) for p, _ in digit_pngs[:2]]
        assert c.post("/v1/explain", files=two).status_code == 400
        png = digit_pngs[0][0].read_bytes()
        assert c.post("/v1/explain?model=nope", files={"file": ("a.png", png, "image/png")}).status_code == 404


def test_attack_gives_a_scored_adversarial_pair(demo, digit_pngs, photo_crops):
    """With --attack-demo: PGD within the model's FGSM budget (0.2 on MNIST, 8/255 on photo crops) flips held-out
    digits, and NCCR calls them adversarial; the returned 8-bit PNG is what was scored (posting it to
    /v1/detect gives the same verdict), and the clean half is /v1/detect's answer for the upload."""
    from PIL import Image

    with demo.client(timeout=120) as c:
        cards = {m["name"]: m for m in c.get("/v1/models").json()}
        assert cards["mnist"]["attack_demo"] is True and cards["photo"]["attack_demo"] is True
        assert cards["mnist"]["explain"] is True
        flipped = caught = 0
        for path, label in digit_pngs[:4]:
            files = {"file": (path.name, path.read_bytes(), "image/png")}
            r = c.post("/v1/attack", files=files)
            assert r.status_code == 200, r.text
            a = r.json()
            assert _without_timings(a["clean"]) == _without_timings(c.post("/v1/detect", files=files).json())
            assert a["attack"]["max_iter"] == 10 and a["attack"]["eps"] == pytest.approx(0.2)
            adv = _png(a["image"]).astype(int)
            clean = np.asarray(Image.open(path)).astype(int)
            assert adv.shape == (28, 28) and np.abs(adv - clean).max() <= round(0.2 * 255) + 1
            assert a["attack"]["l_inf"] <= 0.2 + 1e-6
            again = c.post(
                "/v1/detect", files={"file": ("adv.png", base64.b64decode(a["image"].split(",")[1]), "image/png")}
            )
            assert _without_timings(again.json()) == _without_timings(a["adversarial"])
            flipped += a["adversarial"]["prediction"]["index"] != label
            caught += a["adversarial"]["verdict"] == "adversarial"
        assert flipped >= 3 and caught >= 3
        r = c.post("/v1/attack?model=photo", files={"file": ("c.png", photo_crops[0], "image/png")})
        assert r.status_code == 200, r.text
        a = r.json()
        assert a["attack"]["eps"] == pytest.approx(0.0314) and _png(a["image"]).shape == (32, 32, 3)
        assert a["attack"]["l_inf"] <= 0.0314 + 1e-6
        png = digit_pngs[0][0].read_bytes()
        assert c.post("/v1/attack?model=nope", files={"file": ("a.png", png, "image/png")}).status_code == 404
        assert c.post("/v1/attack", json={"x": 1}).status_code == 415


def test_attack_is_off_by_default_and_explain_can_be_turned_off(tmp_path, digit_pngs):
    """Without --attack-demo the route answers 404 saying how to turn it on, the cards say it is off, and the
    deploy files leave it off; with --no-explain /v1/explain is a 404 too, and /v1/detect still scores."""
    s = start_server(tmp_path, "--models", str(MNIST), "--no-explain")
    try:
        with s.client() as c:
            files = {"file": ("a.png", digit_pngs[0][0].read_bytes(), "image/png")}
            r = c.post("/v1/attack", files=files)
            assert r.status_code == 404 and "--attack-demo" in r.json()["error"]
            r = c.post("/v1/explain", files=files)
            assert r.status_code == 404 and "--no-explain" in r.json()["error"]
            assert c.post("/v1/detect", files=files).status_code == 200
            card = c.get("/v1/models/mnist").json()
            assert card["attack_demo"] is False and card["explain"] is False
    finally:
        s.stop_cleanly()
    deploy = [p for p in (ROOT / "deploy").rglob("*") if p.is_file()]
    assert deploy and not [p for p in deploy if "attack_demo" in p.read_text(errors="ignore").lower().replace("-", "_")]


def test_a_second_attack_meanwhile_is_refused_not_queued(detector, mnist_test):
    """One attack at a time per model: another that comes while it runs is a 503 at once (waiting ones would each
    hold a worker thread), and the attacker works again once the first is done."""
    from nccr_guard.explain import DemoAttack
    from nccr_guard.inputs import InputError

    attacker = DemoAttack.of(detector)
    x = mnist_test[0][0]
    with attacker.lock, pytest.raises(InputError) as refused:  # while an attack is in progress
        attacker.run(x)
    assert refused.value.status == 503 and "running" in str(refused.value)
    adv, info = attacker.run(x)
    assert adv.shape == x.shape and 0 < info["l_inf"] <= 0.2 + 1e-6


def test_explain_an_audio_clip(server):
    """A held-out speaker clip on the default server: the max-combined nccr-audio-v2's three components with the
    max marked, the clean distribution, no thumbnails; its verdict is sequential, so `detection` may have
    stopped before the fixed-K rows the explanation reads (never after them); the demo attack is off there."""
    from nccr_guard.manifest import load_manifest
    from nccr_guard.speaker_corpus import corpus_files

    speaker = load_manifest(ROOT / "models" / "speaker")
    files, _ = corpus_files(speaker.split, "test", limit=2)
    with server.client() as c:
        for f in files:
            files_ = {"file": (f.name, f.read_bytes(), "audio/wav")}
            r = c.post("/v1/explain", files=files_)
            assert r.status_code == 200, r.text
            got, e = r.json()["detection"], r.json()["explanation"]
            assert _without_timings(got) == _without_timings(c.post("/v1/detect", files=files_).json())
            assert got["model"] == "speaker" and e["thumbnails"] == [] and e["rows"] == 18
            assert got["passes"] <= e["rows"]
            comb = e["combiner"]
            assert comb["kind"] == "max" and [k["max"] for k in comb["components"]] == [True, False, False]
            assert comb["components"][0]["z"] == pytest.approx(e["score"], abs=2e-4)
            if got["passes"] == e["rows"]:  # all rows forwarded: the same score
                assert e["score"] == pytest.approx(got["score"], abs=2e-4)
            assert sum(e["clean"]["counts"]) == e["clean"]["n"] > 0
            r = c.post("/v1/attack", files=files_)
            assert r.status_code == 404  # the default server runs without --attack-demo
