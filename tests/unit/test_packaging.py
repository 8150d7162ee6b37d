"""What installing the package brings: a plain install (and so the images) can serve the default models."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

from tests.conftest import ROOT


def dependencies() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_a_plain_install_has_the_speaker_models_encoder():
    """The default speaker model reads its encoder from resemblyzer's own file, checked against the sha256 of
    0.1.4's (nccr_guard.speaker.ENCODER_SHA256): a main dependency, pinned to that version."""
    assert "resemblyzer==0.1.4" in dependencies()
    assert importlib.metadata.version("resemblyzer") == "0.1.4"


def test_the_images_install_what_serving_needs_through_the_package():
    """No image installs a runtime dependency beside the package's own extras (as resemblyzer once was)."""
    installs = re.findall(r"pip install ([^&\n]+)", (ROOT / "Dockerfile").read_text())
    assert installs, "no pip install in the Dockerfile"
    assert not [i for i in installs if "resemblyzer" in i], installs
