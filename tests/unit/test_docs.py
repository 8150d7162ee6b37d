"""The docs that are made, not written: docs/configuration.md is what docs/make_configuration.py makes of the
Settings class, README stays a quick start, and no doc labels past work by a numbered period."""

from __future__ import annotations

import importlib.util
import re

from nccr_guard.config import Settings
from tests.conftest import ROOT


def generator():
    spec = importlib.util.spec_from_file_location("make_configuration", ROOT / "docs" / "make_configuration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_doc_is_what_the_settings_class_makes():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == generator().render(), "docs/configuration.md is stale: run `make docs`"


def test_every_setting_has_a_described_row():
    text = generator().render()
    rows = re.findall(r"^\| `(NCCR_GUARD_[A-Z0-9_]+)`", text, re.M)
    assert rows == [f"NCCR_GUARD_{name.upper()}" for name in Settings.model_fields]
    assert not [name for name, field in Settings.model_fields.items() if not field.description]


def test_a_type_reads_as_a_person_says_it():
    g = generator()
    assert g.type_of(Settings.model_fields["backend"].annotation) == "`torch` \\| `onnx` \\| `auto`"
    assert g.type_of(Settings.model_fields["ssl_certfile"].annotation) == "file or none"
    assert g.limits_of(Settings.model_fields["score_decimals"]) == " (≥ 0, ≤ 12)"


def test_the_readme_is_a_quick_start_and_the_references_stay_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 120
    assert len((ROOT / "docs" / "nccr.md").read_text().splitlines()) <= 250
    assert len((ROOT / "docs" / "performance.md").read_text().splitlines()) <= 200


def test_no_doc_labels_past_work_by_a_numbered_period():
    docs = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    labelled = {p.name: m for p in docs if (m := re.findall(r"\bsessions? \d+", p.read_text(), re.I))}
    assert not labelled, labelled


def test_every_audio_format_that_decodes_is_named_wherever_formats_are_listed():
    """The format lists of the README, docs/api.md, docs/model-format.md, the page and the 415 answer name each
    audio format uploads are decoded from (MP3 was missing from some once decoding took it), and each decodes."""
    import numpy as np

    from nccr_guard.audio import encode_wav
    from nccr_guard.inputs import InputError, decode, sniff_modality
    from nccr_guard.manifest import load_manifest

    speaker = load_manifest(ROOT / "models" / "speaker")
    tone = (0.3 * np.sin(np.arange(40000) / 16000 * 2 * np.pi * 220)).astype(np.float32)
    formats = {"WAV": ("PCM_16", "WAV"), "FLAC": ("PCM_16", "FLAC"), "OGG": ("VORBIS", "OGG"), "MP3": (None, "MP3")}
    for name, (subtype, fmt) in formats.items():
        data = encode_wav(tone, 16000, subtype or "MPEG_LAYER_III", fmt)
        assert sniff_modality(data) == "audio" and decode(data, speaker).shape == (1, 48000), name
    try:
        sniff_modality(b"not a known format")
    except InputError as e:
        refusal = str(e)
    page = (ROOT / "service" / "nccr_guard" / "server" / "static" / "index.html").read_text()
    lists = {
        "README.md": (ROOT / "README.md").read_text(),
        "docs/api.md": (ROOT / "docs" / "api.md").read_text(),
        "docs/model-format.md": (ROOT / "docs" / "model-format.md").read_text(),
        "index.html": page,
        "the 415 answer": refusal,
    }
    for where, text in lists.items():
        assert all(re.search(rf"\b{name}\b", text) for name in formats), where
