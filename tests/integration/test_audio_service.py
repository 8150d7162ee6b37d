"""Audio through the real server and CLI: held-out synthesised speakers as WAV / FLAC uploads, hostile audio over
HTTP, and the audio evaluation harness on a few clips."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from nccr_guard.manifest import load_manifest
from nccr_guard.speaker_corpus import corpus_files
from tests.conftest import BIN, ROOT

SPEAKER_DIR = ROOT / "models" / "speaker"
SPEAKER = load_manifest(SPEAKER_DIR)


@pytest.fixture(scope="module")
def held_out_clips() -> list[tuple[bytes, str]]:
    """One held-out test-split clip of every speaker, as the synthesiser wrote it (16, 22.05 or 32 kHz WAV)."""
    files, ys = corpus_files(SPEAKER.split, "test", limit=len(SPEAKER.labels))
    return [(f.read_bytes(), SPEAKER.labels[y]) for f, y in zip(files, ys, strict=True)]


def test_held_out_speakers_are_identified_over_http(server, held_out_clips):
    with server.client() as c:
        correct = 0
        for data, speaker in held_out_clips:
            r = c.post("/v1/detect", files={"file": ("clip.wav", data, "audio/wav")})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == "speaker" and body["modality"] == "audio"
            assert body["verdict"] in ("clean", "adversarial") and 0 < body["p_value"] <= 1
            correct += body["prediction"]["label"] == speaker
        assert correct >= len(held_out_clips) - 1
        # the same clip as FLAC, raw body, model named explicitly
        import io

        import soundfile as sf

        wav, rate = sf.read(io.BytesIO(held_out_clips[0][0]), dtype="float32")
        buf = io.BytesIO()
        sf.write(buf, wav, rate, format="FLAC")
        r = c.post("/v1/detect?model=speaker", content=buf.getvalue(), headers={"content-type": "audio/flac"})
        assert r.status_code == 200 and r.json()["prediction"]["label"] == held_out_clips[0][1]


def test_mp3_uploads_go_to_the_speaker_model(server, held_out_clips):
    """Held-out clips as MP3 (libsndfile's encoder), sent without a model: told apart as audio by their bytes and
    identified as their WAVs are."""
    import io

    import soundfile as sf

    with server.client() as c:
        correct = 0
        for data, speaker in held_out_clips:
            wav, rate = sf.read(io.BytesIO(data), dtype="float32")
            buf = io.BytesIO()
            sf.write(buf, wav, rate, format="MP3")
            r = c.post("/v1/detect", files={"file": ("clip.mp3", buf.getvalue(), "audio/mpeg")})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "speaker" and r.json()["verdict"] in ("clean", "adversarial")
            correct += r.json()["prediction"]["label"] == speaker
        assert correct >= len(held_out_clips) - 1


def test_cli_scores_a_clip(tmp_path, held_out_clips):
    clip = tmp_path / "clip.wav"
    clip.write_bytes(held_out_clips[3][0])
    r = subprocess.run([str(BIN), "score", str(clip)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["model"] == "speaker" and out["prediction"]["label"] == held_out_clips[3][1]
    r = subprocess.run(
        [str(BIN), "score", str(clip), "--sequential-schedule", "speaker=4/4/2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # four copies of each noise family, the original and the 12-bit row in the first round
    assert json.loads(r.stdout.strip().splitlines()[-1])["passes"] >= 10
    for bad, why in (("speakr=4/4/2", "names speakr, not among mnist, speaker"), ("4/4", "expected first/step/z")):
        r = subprocess.run(
            [str(BIN), "score", str(clip), "--sequential-schedule", bad], capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_audio_harness_smoke(tmp_path):
    out = tmp_path / "speaker-report"
    r = subprocess.run(
        [str(BIN), "evaluate", "--model", str(SPEAKER_DIR), "--n", "10", "--calib-n", "20"]
        + ["--attacks", "fgsm", "pgd_targeted", "--seed", "0", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["model"] == "speaker" and ev["n_clean"] >= 9
    assert set(ev["attacks"]) == {"fgsm", "pgd_targeted"}
    for name, a in ev["attacks"].items():
        assert a["n_adversarial"] >= 1, name
        assert set(a["detectors"]) == {"nccr", "nccr_seq", "prediction_flip", "waveguard_resample", "low_margin"}
        assert np.isfinite(a["median_snr_db"]) and a["median_snr_db"] > 10
    rows = ev["sequential"]["mean_rows"]
    assert set(rows) == {"clean", "fgsm", "pgd_targeted"} and all(
        0 < r <= ev["sequential"]["fixed_rows"] for r in rows.values()
    )
    assert {p.name for p in out.iterdir()} >= {"eval.json", "eval.md", "roc.png", "scores.png"}
    # The audio shift set: each change of a clean clip, and clips that are no speech at all.
    from nccr_guard.eval.audio_shifts import INPUT_CHANGES

    assert set(ev["benign_shifts"]) == {*INPUT_CHANGES, "none"}
    assert set(ev["ood_inputs"]) == {"silence", "white_noise", "tone", "chirp"}
    for r in [*ev["benign_shifts"].values(), *ev["ood_inputs"].values()]:
        assert 0 <= r["nccr"] <= 1 and 0 <= r["nccr_ood"] <= 1 and not r.get("fitted")
    assert "| rate_8k |" in (out / "eval.md").read_text()


def test_sequential_testing_over_http_and_turned_off(server, held_out_clips, tmp_path):
    """Concurrent clips share forwards at different rounds; verdicts use at most the fixed-K rows, fewer on
    average; `--no-sequential` forwards all of them and agrees on the verdict of every clear-cut clip."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import start_server

    def detect_all(url_server) -> list[dict]:
        with url_server.client() as c, ThreadPoolExecutor(6) as ex:
            post = lambda d: c.post("/v1/detect", files={"file": ("c.wav", d, "audio/wav")}).json()  # noqa: E731
            return list(ex.map(post, [d for d, _ in held_out_clips]))

    with server.client() as c:
        card = c.get("/v1/models/speaker").json()
    assert card["sequential"] is not None and card["truncated_to"] is None
    seq = detect_all(server)
    assert all(1 < b["passes"] <= card["passes"] for b in seq)
    assert np.mean([b["passes"] for b in seq]) < card["passes"]
    off = start_server(tmp_path, "--models", str(SPEAKER_DIR), "--no-sequential")
    try:
        with off.client() as c:
            assert c.get("/v1/models/speaker").json()["sequential"] is None
        fixed = detect_all(off)
    finally:
        off.stop()
    assert all(b["passes"] == card["passes"] for b in fixed)
    for s, f in zip(seq, fixed, strict=True):
        if abs(f["score"] - f["threshold"]) > 0.5:
            assert s["verdict"] == f["verdict"]
        assert s["prediction"] == f["prediction"]


def test_a_chosen_sequential_schedule_replaces_the_variants(tmp_path, held_out_clips):
    """NCCR_GUARD_SEQUENTIAL_SCHEDULE (as `--sequential-schedule`) swaps the speaker's schedule (named, beside a
    label for the others): three spread shifts
    in the first round, so no verdict forwards fewer than 6 rows (the original, the 12-bit row, three shifts, one
    noisy copy); the image model, which draws no noise copies, is served as before. A family the variant does not
    draw stops the server at start-up with the reason, and a label that does not parse is one line from the CLI."""
    from tests.conftest import MNIST, start_server

    s = start_server(
        tmp_path,
        "--models",
        str(MNIST),
        str(SPEAKER_DIR),
        env={"NCCR_GUARD_SEQUENTIAL_SCHEDULE": "speaker=1 (sweep 3)/1/1.5; 4/4/2"},
    )
    try:
        with s.client() as c:
            card = c.get("/v1/models/speaker").json()
            assert card["sequential"]["label"] == "1 (sweep 3)/1/1.5" and card["sequential"]["first_by"] == [
                ["sweep", 3]
            ]
            assert c.get("/v1/models/mnist").json()["sequential"] is None
            passes = [
                c.post("/v1/detect", files={"file": ("c.wav", d, "audio/wav")}).json()["passes"]
                for d, _ in held_out_clips[:4]
            ]
    finally:
        s.stop()
    assert all(6 <= p <= card["passes"] for p in passes), passes
    with pytest.raises(RuntimeError, match="swep"):
        start_server(tmp_path, "--models", str(SPEAKER_DIR), "--sequential-schedule", "1 (swep 3)/1/1.5").stop()
    with pytest.raises(RuntimeError, match="names nosuch, not served here"):
        start_server(tmp_path, "--models", str(MNIST), "--sequential-schedule", "nosuch=4/4/2").stop()
    weighted = "names mnist, whose variant nccr-v4 combines its readings by a weighted sum"
    with pytest.raises(RuntimeError, match=weighted):
        start_server(tmp_path, "--models", str(MNIST), "--sequential-schedule", "mnist=4/4/2").stop()
    r = subprocess.run([str(BIN), "serve", "--sequential-schedule", "1/1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "expected first/step/z" in r.stderr and "Traceback" not in r.stderr


def test_speaker_rows_built_in_torch_agree_with_the_numpy_rows():
    """The CUDA code path for audio (rows, spread shifts included, built in torch next to the model), exercised on
    the CPU: same predictions, mostly the same verdicts (the noise copies differ), every row forwarded."""
    from nccr_guard.datasets import load_split
    from nccr_guard.detector import Detector

    xs = list(load_split(SPEAKER, "test", index=np.arange(0, 300, 30))[0])
    ref = Detector.load(SPEAKER_DIR, device="cpu", sequential=False).detect(xs)
    det = Detector.load(SPEAKER_DIR, device="cpu", sequential=False)
    det.backend.device_rows = True
    got = det.detect(xs)
    assert [v.index for v in got] == [v.index for v in ref]
    assert all(v.passes == 18 for v in got)
    assert np.mean([u.verdict == v.verdict for u, v in zip(ref, got, strict=True)]) >= 0.8
    a, b = np.array([v.score for v in ref]), np.array([v.score for v in got])
    assert np.corrcoef(a, b)[0, 1] > 0.9


def test_speaker_sequential_rounds_online_match_the_replay():
    """The speaker's default schedule (per-family first rounds: two spread shifts, one noisy copy) run online,
    round by round as the server does, decides as the replay of the same clips' fixed-K rows."""
    from nccr_guard.datasets import load_split
    from nccr_guard.detector import Detector
    from nccr_guard.engine.sequential import replay

    xs = list(load_split(SPEAKER, "test", index=np.arange(15, 300, 30))[0])
    det = Detector.load(SPEAKER_DIR, device="cpu")
    assert det.schedule is not None and det.schedule.first_by
    got = det.detect(xs)
    want, passes = replay(det.variant, det.calib, det.activations(xs), det.schedule)
    # Across batches (tests/tolerance.py): the rounds forward other row counts than the replay's one forward, so
    # scores agree within 1e-4 (O(1) z-scores); the stopping rounds are compared exactly, which holds while no
    # clip's bound lies within float32 noise of the threshold (true of these ten on the processors tried).
    assert [v.passes for v in got] == passes.tolist() and passes.min() < det.variant.rows
    assert np.allclose([v.score for v in got], want.score, atol=1e-4)
