"""The model folder format (docs/model-format.md): `models/<name>/model.toml` plus weights and artifacts."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from nccr_guard.engine.variants import DEFAULT_VARIANT


class ManifestError(ValueError):
    """A model folder that cannot be served as it is; the message says what to fix."""


class ImageSpec(BaseModel):
    mode: Literal["L", "RGB"] = "L"
    resize: tuple[int, int] | None = None  # (height, width)
    invert: bool = False  # dark-on-light uploads become light-on-dark (MNIST convention)
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])


class AudioSpec(BaseModel):
    sample_rate: int = 16000
    seconds: float = 3.0  # clips are cropped / zero-padded to this length
    normalize_dbfs: float | None = -30.0


class InputSpec(BaseModel):
    shape: list[int]  # one sample, no batch axis
    dtype: Literal["float32"] = "float32"
    range: tuple[float, float] = (0.0, 1.0)
    image: ImageSpec | None = None
    audio: AudioSpec | None = None


class WeightsSpec(BaseModel):
    torch_module: str | None = None  # "package.module:Class"
    state_dict: str | None = None
    torchscript: str | None = None
    onnx: str | None = None


class Manifest(BaseModel):
    name: str
    modality: Literal["image", "audio"]
    version: str = "1"
    labels: list[str]
    input: InputSpec
    weights: WeightsSpec
    watch: list[str] = Field(default_factory=list, description="watched layers besides the logits")
    variant: str = DEFAULT_VARIANT
    calibration: str = "calibration.npz"
    k: int | None = None
    split: dict = Field(default_factory=dict)
    root: Path = Path(".")

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        if self.modality == "image" and self.input.image is None:
            self.input.image = ImageSpec()
        if self.modality == "audio" and self.input.audio is None:
            self.input.audio = AudioSpec()
        if not (self.weights.onnx or self.weights.state_dict or self.weights.torchscript):
            raise ValueError("weights: give at least one of onnx, state_dict, torchscript")
        return self

    def path(self, rel: str) -> Path:
        return self.root / rel

    @property
    def calibration_path(self) -> Path:
        return self.path(self.calibration)


def load_manifest(folder: Path | str) -> Manifest:
    folder = Path(folder)
    file = folder / "model.toml"
    if not file.is_file():
        raise ManifestError(f"{folder}: no model.toml (is this a model folder?)")
    try:
        data = tomllib.loads(file.read_text())
        return Manifest(**data, root=folder.resolve())
    except (tomllib.TOMLDecodeError, ValidationError, TypeError) as e:
        raise ManifestError(f"{file}: {e}") from None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weight_hashes(m: Manifest) -> dict[str, str]:
    """sha256 of every weights file the manifest names and that exists."""
    files = [m.weights.state_dict, m.weights.torchscript, m.weights.onnx]
    return {f: sha256(m.path(f)) for f in files if f and m.path(f).exists()}
