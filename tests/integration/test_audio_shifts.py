"""eval.audio_shifts on the shipped speaker model: every benign change of a clean upload and two voices outside
the enrolled set go through the upload path and the served detector, into a JSON and a markdown report."""

from __future__ import annotations

import json

import pytest

from nccr_guard.eval import audio_shifts
from tests.conftest import ROOT


def test_benign_changes_and_unknown_voices_are_scored_as_uploads(tmp_path):
    audio_shifts.main(["--model", str(ROOT / "models" / "speaker"), "--n", "10", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "shifts.json").read_text())
    assert list(r["changes"]) == list(audio_shifts.CHANGES)
    assert set(r["unknown_voices"]) == set(audio_shifts.UNKNOWN_VOICES)
    # Clips under the model's 2 s minimum are refused (422 on upload), never scored; the rest are all scored.
    short = {k for k in audio_shifts.CHANGES if k in ("length_0.5s", "length_1s", "length_1.5s")}
    for name, x in r["changes"].items():
        assert x["refused"] == (1.0 if name in short else 0.0), name
        assert ("if_accepted" in x) == (name in short), name  # what the minimum saves: scored anyway
    assert r["changes"]["length_0.5s"]["if_accepted"]["n"] == 10
    scored = [x for k, x in r["changes"].items() if k not in short] + list(r["unknown_voices"].values())
    for x in scored:
        assert x["n"] in (5, 10) and 0 <= x["adversarial"] <= 1 and 0 < x["confidence"] <= 1
    assert r["sequential"] and r["variant"] == "nccr-audio-v2" and r["min_seconds"] == 2.0
    md = (tmp_path / "shifts.md").read_text()
    assert md.count("\n| ") == len(audio_shifts.CHANGES) + len(audio_shifts.UNKNOWN_VOICES) + 2
    if not r["has_ood_threshold"]:
        assert "no `ood` threshold" in md
    with pytest.raises(SystemExit):
        audio_shifts.main(["--n", "x"])
