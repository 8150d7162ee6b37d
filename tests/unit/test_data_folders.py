"""Data folders as `calibrate --data` and `evaluate --data` read them: every file type an upload may be, and
labelled data (a subfolder per label, or an .npz of x and y) cut into a held-out and a calibration half."""

from __future__ import annotations

import numpy as np
import pytest

from nccr_guard.audio import encode_wav
from nccr_guard.datasets import SUFFIXES, load_folder
from nccr_guard.manifest import ManifestError, load_manifest
from tests.conftest import ROOT

SPEAKER = ROOT / "models" / "speaker"


def tone(seconds: float = 2.5, rate: int = 16000) -> np.ndarray:
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


def test_labelled_npz_is_cut_into_a_held_out_half_and_a_calibration_half(tmp_path):
    from nccr_guard.datasets import calibration_splits, load_calibration, load_split, split_size, with_data

    m = load_manifest(ROOT / "models" / "mnist")
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, (40, 1, 28, 28)).astype(np.float32), np.repeat(np.arange(10), 4)
    np.savez(tmp_path / "d.npz", x=x, y=rng.permutation(y))
    mine, held = with_data(m, tmp_path / "d.npz")
    assert held.startswith("data-") and calibration_splits(mine) == [f"{held}-calib"] and split_size(mine, held) == 20
    xh, yh = load_split(mine, held)
    xc, yc = load_calibration(mine)
    assert (np.bincount(yh) == 2).all() and (np.bincount(yc) == 2).all()  # half of each label on either side
    assert not {a.tobytes() for a in xh} & {a.tobytes() for a in xc}
    assert len(load_split(mine, held, limit=10)[0]) == 10
    np.savez(tmp_path / "other.npz", x=x[::-1], y=y)
    assert with_data(m, tmp_path / "other.npz")[1] != held  # other inputs, other split names (caches)


def test_labelled_folders_by_label_or_index_and_clear_refusals(tmp_path):
    from nccr_guard.datasets import labelled_data, load_split

    m = load_manifest(SPEAKER)
    for sub, n in ((m.labels[0], 2), ("3", 1)):
        (tmp_path / "ok" / sub).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "ok" / sub / f"{i}.wav").write_bytes(encode_wav(tone()))
    x, y = labelled_data(tmp_path / "ok", m)
    assert x.shape == (3, 1, 48000) and y.tolist() == [0, 0, 3]
    (tmp_path / "bad" / "nobody").mkdir(parents=True)
    with pytest.raises(ManifestError, match="name no label"):
        labelled_data(tmp_path / "bad", m)
    (tmp_path / "flat").mkdir()
    with pytest.raises(ManifestError, match="no subfolders"):
        labelled_data(tmp_path / "flat", m)
    np.savez(tmp_path / "wrong.npz", x=np.zeros((2, 1, 28, 28), np.float32), y=np.zeros(2))
    with pytest.raises(ManifestError, match="want x"):
        labelled_data(tmp_path / "wrong.npz", m)
    with pytest.raises(ManifestError, match="pass --data"):
        load_split(m.model_copy(update={"split": {}}), "test")
