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
    for x in [*r["changes"].values(), *r["unknown_voices"].values()]:
        assert x["n"] in (5, 10) and 0 <= x["adversarial"] <= 1 and 0 < x["confidence"] <= 1
    assert r["sequential"] and r["variant"] == "nccr-audio-v2"
    # Half a second of speech padded to 3 s is what the detector flags most (the false alarm the report shows).
    assert r["changes"]["length_0.5s"]["adversarial"] > r["changes"]["none"]["adversarial"]
    md = (tmp_path / "shifts.md").read_text()
    assert md.count("\n| ") == len(audio_shifts.CHANGES) + len(audio_shifts.UNKNOWN_VOICES) + 2
    if not r["has_ood_threshold"]:
        assert "no `ood` threshold" in md
    with pytest.raises(SystemExit):
        audio_shifts.main(["--n", "x"])
