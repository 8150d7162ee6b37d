"""Data folders as `calibrate --data` and `evaluate --data` read them: every file type an upload may be."""

from __future__ import annotations

import numpy as np

from nccr_guard.audio import encode_wav
from nccr_guard.datasets import SUFFIXES, load_folder
from nccr_guard.manifest import load_manifest
from tests.conftest import ROOT

SPEAKER = ROOT / "models" / "speaker"


def tone(seconds: float = 1.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_a_folder_of_wav_flac_ogg_and_mp3_clips_is_read_whole(tmp_path):
    """MP3 uploads are accepted (libsndfile decodes them), so a data folder's MP3 clips count too."""
    for fmt, subtype, suffix in (("WAV", "PCM_16", "wav"), ("FLAC", "PCM_16", "flac"), ("OGG", "VORBIS", "ogg")):
        (tmp_path / f"clip.{suffix}").write_bytes(encode_wav(tone(), 16000, subtype, fmt))
    (tmp_path / "clip.mp3").write_bytes(encode_wav(tone(), 16000, "MPEG_LAYER_III", "MP3"))
    (tmp_path / "notes.txt").write_text("not audio")
    xs, files = load_folder(tmp_path, load_manifest(SPEAKER))
    assert [f.suffix for f in files] == [".flac", ".mp3", ".ogg", ".wav"] and xs.shape == (4, 1, 48000)
    assert {".mp3", ".png", ".webp", ".tiff", ".flac"} <= SUFFIXES
