"""Backends hide torch vs ONNX Runtime behind one small protocol: a batch in, logits + watched layers out.

Chosen by name from a registry (`torch | onnx | auto`); each imports its framework only when built.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np

from nccr_guard.manifest import Manifest

if TYPE_CHECKING:
    from nccr_guard.backends.onnx_verdict import VerdictGraph

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """The backend cannot serve this model here (missing weights, framework, or device)."""


class Backend(Protocol):
    name: str
    device: str
    layers: list[str]  # watched layers, in output order after "logits"
    supports_gradients: bool
    cuda_graphs: bool  # forwards replay captured CUDA graphs (torch on CUDA)
    fuses_verdicts: bool  # Detector runs nccr-v3-like verdicts through fused_verdicts (ONNX; torch on CUDA)

    def forward(self, x: np.ndarray, upto: list[str] | None = None) -> dict[str, np.ndarray]:
        """x: (B, *input_shape) float32 -> {"logits": (B, C), layer: (B, N), ...} float32 numpy arrays.

        upto: only these watched layers, no logits, computing as little of the network as it takes (the
        truncated forward of perturbed copies whose logits no component reads)."""
        ...

    def fused_verdicts(self, spec: VerdictGraph, shape: list[int]) -> Callable[[np.ndarray], list[np.ndarray]]:
        """The whole fixed-K verdict of `spec` in one call: inputs (B, *shape) in, engine.Scores' four arrays
        (score, raw, prediction, confidence) out. Raises where the model cannot take it."""
        ...


def reduce_tap(a: np.ndarray) -> np.ndarray:
    """One value per neuron: conv maps (B, C, H, W) average over space, sequences (B, T, H) over time."""
    if a.ndim == 4:
        return a.mean(axis=(2, 3))
    if a.ndim == 3:
        return a.mean(axis=1)
    return a.reshape(a.shape[0], -1)


def merge_rows(full: dict[str, np.ndarray], part: dict[str, np.ndarray], original: np.ndarray) -> dict[str, np.ndarray]:
    """Put the originals' full outputs and the copies' truncated ones back into row order (`original`: bool mask
    over rows). What the copies did not compute (the logits, unread layers) is NaN, so a reader would notice."""
    out = {}
    for k, v in full.items():
        a = np.full((len(original), v.shape[1]), np.nan, np.float32)
        a[original] = v
        if k in part:
            a[~original] = part[k]
        out[k] = a
    return out


def make_backend(
    name: str,
    manifest: Manifest,
    device: str = "auto",
    threads: int = 0,
    half: bool = False,
    cuda_graphs: bool = True,
) -> Backend:
    """Build the named backend. `auto`: ONNX Runtime on the CPU when the folder has an ONNX file (measured 4-6x
    faster than torch eager for small models, docs/performance.md), torch on CUDA or without an ONNX file.
    `half` and `cuda_graphs` apply to torch on CUDA only. A model without the named backend's weights in its
    model.toml (the speaker model has no ONNX file) is served on the other backend, with a warning, so that one
    `--backend` serves a mixed set of models."""
    if name == "auto":
        name = _auto(manifest, device)
    elif name in WEIGHTS and not has_weights(manifest, name) and has_weights(manifest, other := _other(name)):
        log.warning(
            "%s: no %s weights in model.toml (needs %s): served on the %s backend instead",
            manifest.name,
            name,
            WEIGHTS[name],
            other,
        )
        name = other
    if name == "torch":
        from nccr_guard.backends.torch_backend import TorchBackend

        return TorchBackend(manifest, device=device, threads=threads, half=half, cuda_graphs=cuda_graphs)
    if name == "onnx":
        from nccr_guard.backends.onnx_backend import OnnxBackend

        return OnnxBackend(manifest, device=device, threads=threads)
    raise BackendError(f"unknown backend {name!r}; choose torch, onnx or auto")


WEIGHTS = {"torch": "torchscript, or torch_module + state_dict", "onnx": "onnx"}  # what each backend loads


def _other(backend: str) -> str:
    return "onnx" if backend == "torch" else "torch"


def has_weights(manifest: Manifest, backend: str) -> bool:
    """Whether model.toml names the weights `backend` loads (a model may ship weights for one backend only)."""
    w = manifest.weights
    return bool(w.onnx) if backend == "onnx" else bool(w.torchscript or (w.torch_module and w.state_dict))


def _auto(manifest: Manifest, device: str) -> str:
    has_torch = bool(manifest.weights.state_dict or manifest.weights.torchscript) and _importable("torch")
    has_onnx = bool(manifest.weights.onnx) and _importable("onnxruntime")
    if not has_torch or (has_onnx and device == "cpu"):
        return "onnx"
    if device == "cuda" or not has_onnx:
        return "torch"
    import torch  # device "auto": the GPU if torch sees one

    return "torch" if torch.cuda.is_available() else "onnx"


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
