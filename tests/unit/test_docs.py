"""The docs that are made, not written: docs/configuration.md is what docs/make_configuration.py makes of the
Settings class."""

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

