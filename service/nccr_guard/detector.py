"""A model ready to give verdicts: manifest + backend + NCCR variant + calibration, checked against each other.

Shared by the server, the CLI and the evaluation harness. Input arrays are in model-input space (the
manifest's shape and value range, before normalisation); perturbations are applied there.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nccr_guard.backends import Backend, make_backend
from nccr_guard.engine import Calibration, Variant, build_rows, get_variant, score_rows
from nccr_guard.manifest import Manifest, ManifestError, load_manifest, weight_hashes

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    verdict: str
    score: float
    threshold: float
    p_value: float
    index: int
    label: str
    confidence: float
    passes: int
    components: dict[str, float] = field(default_factory=dict)

    @property
    def adversarial(self) -> bool:
        return self.verdict == "adversarial"


def check_hashes(manifest: Manifest, calib: Calibration, backend_name: str) -> None:
    """Refuse artifacts made for other weights: a threshold fitted on one model means nothing on another."""
    made_for = calib.meta.get("weights_sha256", {})
    file = (
        manifest.weights.onnx
        if backend_name == "onnx"
        else (manifest.weights.torchscript or manifest.weights.state_dict)
    )
    have = weight_hashes(manifest).get(file or "")
    if file not in made_for or made_for[file] != have:
        raise ManifestError(
            f"{manifest.calibration_path}: calibration was made for {file} with sha256 "
            f"{str(made_for.get(file))[:12]}…, but the file has {str(have)[:12]}…; run `nccr-guard calibrate "
            f"--model {manifest.root}`"
        )


class Detector:
    def __init__(
        self, manifest: Manifest, backend: Backend, variant: Variant, calib: Calibration | None, seed: int = 0
    ) -> None:
        self.manifest, self.backend, self.variant, self.calib, self.seed = manifest, backend, variant, calib, seed
        spec = manifest.input.image
        self._mean = np.array(spec.mean if spec else [0.0], np.float32).reshape(
            -1, *[1] * (len(manifest.input.shape) - 1)
        )
        self._std = np.array(spec.std if spec else [1.0], np.float32).reshape(self._mean.shape)

    @classmethod
    def load(
        cls,
        folder: Path | str,
        backend: str = "auto",
        device: str = "auto",
        k: int | None = None,
        seed: int = 0,
        threads: int = 0,
        calibrated: bool = True,
        half: bool = False,
    ) -> Detector:
        manifest = load_manifest(folder)
        be = make_backend(backend, manifest, device=device, threads=threads, half=half)
        calib = None
        variant = get_variant(manifest.variant)
        if calibrated:
            if not manifest.calibration_path.exists():
                raise ManifestError(f"{manifest.calibration_path} missing: run `nccr-guard calibrate --model {folder}`")
            calib = Calibration.load(manifest.calibration_path)
            check_hashes(manifest, calib, be.name)
            variant = get_variant(calib.variant)
        k = k or manifest.k or (calib.meta.get("k") if calib else None)
        if k:
            variant = variant.with_k(int(k))
        if calib and calib.meta.get("k") and int(calib.meta["k"]) != int(k or 0):
            log.warning("K=%s differs from the calibrated K=%s: the false-positive rate may drift", k, calib.meta["k"])
        return cls(manifest, be, variant, calib, seed)

    @property
    def rows_per_input(self) -> int:
        return self.variant.rows

    def rows(self, x: np.ndarray) -> np.ndarray:
        """(R, *shape) original + perturbed copies, seeded by (seed, input content): reproducible per input."""
        x = np.asarray(x, np.float32)
        if list(x.shape) != self.manifest.input.shape:
            raise ValueError(f"input shape {list(x.shape)} != model input {self.manifest.input.shape}")
        rng = np.random.default_rng([self.seed, zlib.crc32(x.tobytes())])
        return build_rows(x, self.variant.perturbations, rng, tuple(self.manifest.input.range))

    def forward(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Backend forward of stacked rows (n, *shape) -> layer -> (n, N)."""
        return self.backend.forward((rows - self._mean) / self._std)

    def activations(self, xs: list[np.ndarray] | np.ndarray, chunk: int = 0) -> dict[str, np.ndarray]:
        """layer -> (B, R, N) for a list of inputs, in forwards of at most `chunk` inputs (0 = one forward)."""
        xs = list(xs)
        chunk = chunk or len(xs)
        parts = []
        for i in range(0, len(xs), chunk):
            part = xs[i : i + chunk]
            if getattr(self.backend, "device_rows", False):  # GPU: rows built next to the model
                batch = np.stack([np.asarray(x, np.float32) for x in part])
                seed = zlib.crc32(batch.tobytes(), self.seed)
                parts.append(
                    self.backend.forward_perturbed(
                        batch, self.variant.perturbations, tuple(self.manifest.input.range), seed, self._mean, self._std
                    )
                )
            else:
                parts.append(self.forward(np.concatenate([self.rows(x) for x in part])))
        r = self.rows_per_input
        return {k: np.concatenate([p[k] for p in parts]).reshape(len(xs), r, -1) for k in parts[0]}

    def verdicts(self, acts: dict[str, np.ndarray]) -> list[Verdict]:
        """Verdicts from layer -> (B, R, N) activations."""
        if self.calib is None:
            raise ManifestError(f"{self.manifest.name}: not calibrated")
        s = score_rows(self.variant, self.calib, acts)
        names = [c.name for c in self.variant.components]
        pv = self.calib.p_value(s.score)
        out = []
        for i in range(len(s.score)):
            adv = bool(s.score[i] > self.calib.threshold)
            idx = int(s.prediction[i])
            out.append(
                Verdict(
                    verdict="adversarial" if adv else "clean",
                    score=float(s.score[i]),
                    threshold=self.calib.threshold,
                    p_value=float(pv[i]),
                    index=idx,
                    label=self._label(idx),
                    confidence=float(s.confidence[i]),
                    passes=self.rows_per_input,
                    components=dict(zip(names, map(float, s.raw[i]), strict=True)),
                )
            )
        return out

    def detect(self, xs: list[np.ndarray] | np.ndarray, chunk: int = 0) -> list[Verdict]:
        return self.verdicts(self.activations(xs, chunk))

    def _label(self, idx: int) -> str:
        labels = self.manifest.labels
        return labels[idx] if 0 <= idx < len(labels) else str(idx)
