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
    fit: Literal["stretch", "crop"] = "stretch"  # uploads of another shape: resized whole, or centre-cropped first
    invert: bool = False  # dark-on-light uploads become light-on-dark (MNIST convention)
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])


class AudioSpec(BaseModel):
    sample_rate: int = 16000
    seconds: float = 3.0  # clips are cropped / repeated to this length
    normalize_dbfs: float | None = -30.0
    # Shorter uploads are refused (422): too little speech to tell an unstable reading from an attack
    # (reports/speaker/shifts measures the false alarms by length).
    min_seconds: float = 0.0


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
    attack_scale: float = Field(
        1.0,
        gt=0,
        description="multiplies the L-inf / L2 budgets of the evaluation's image attacks, which are set for MNIST "
        "(L-inf 0.2-0.3); 0.157 gives natural images the usual 8/255",
    )
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


def onnx_data_files(m: Manifest) -> list[str]:
    """The external data files of the manifest's ONNX file, relative to the model folder, as its graph names them
    (`model.onnx.data`: torch.onnx.export's default exporter keeps the weights there, beside a small graph file)."""
    if not m.weights.onnx or not m.path(m.weights.onnx).exists():
        return []
    graph_file = Path(m.weights.onnx)
    try:
        import onnx
    except ImportError:  # no parser: the exporter's file name, where it exists
        guess = graph_file.with_name(graph_file.name + ".data")
        return [guess.as_posix()] if m.path(guess.as_posix()).exists() else []
    model = onnx.load(str(m.path(m.weights.onnx)), load_external_data=False)
    found = dict.fromkeys(
        (graph_file.parent / entry.value).as_posix()
        for t in _tensors(model.graph)
        if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data
        if entry.key == "location"
    )
    return list(found)


def _tensors(graph):
    """Every tensor stored in an ONNX graph: initializers, constants' values, and those of nested graphs."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for g in [a.g] if a.HasField("g") else a.graphs:
                yield from _tensors(g)


def loaded_files(m: Manifest, backend: str) -> list[str]:
    """The weights files `backend` reads: the ONNX file and its external data, or the TorchScript file or state
    dict (a torch_module's code is no file of the folder)."""
    if backend == "onnx":
        return [m.weights.onnx, *onnx_data_files(m)] if m.weights.onnx else []
    return [f] if (f := m.weights.torchscript or m.weights.state_dict) else []


def weight_hashes(m: Manifest, files: list[str] | None = None) -> dict[str, str]:
    """sha256 of `files` (default: every weights file the manifest names or its ONNX file refers to) that exist."""
    if files is None:
        files = [f for f in (m.weights.state_dict, m.weights.torchscript, m.weights.onnx) if f]
        files += onnx_data_files(m)
    return {f: sha256(m.path(f)) for f in files if m.path(f).exists()}
