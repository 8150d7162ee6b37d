"""What a verdict is made of, for a person to look at (the page at `/`, `POST /v1/explain`), and a small attack
on one input to show a clean / adversarial pair (`POST /v1/attack`, off unless `--attack-demo`).

Nothing here scores anything itself: the rows are the detector's own (`Detector.rows`, seeded by the input's
content, so the very rows a fixed-K verdict forwards), the readings and the score the engine's
(`score.score_rows`, `combiner.zscores`), the attack ART's through eval/attacks.py. This module only picks what
to show: a few rows as thumbnails, the components that weigh most, the clean score distribution as a histogram.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from dataclasses import dataclass

import numpy as np

from nccr_guard.detector import Detector
from nccr_guard.engine.combiner import zscores
from nccr_guard.engine.perturb import RANDOM_FAMILIES
from nccr_guard.engine.score import score_rows
from nccr_guard.inputs import InputError

HISTOGRAM_BINS = 30
TOP_CONTRIBUTIONS = 10  # a logistic variant's largest |weight x z| terms shown; the rest are summed


def png_bytes(x: np.ndarray, value_range: tuple[float, float]) -> bytes:
    """One image in model-input space ((C, H, W), C 1 or 3) as an 8-bit PNG."""
    from PIL import Image

    lo, hi = value_range
    u8 = (np.clip((x - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)
    img = Image.fromarray(u8[0]) if u8.shape[0] == 1 else Image.fromarray(np.moveaxis(u8, 0, -1))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def png_data_uri(x: np.ndarray, value_range: tuple[float, float]) -> str:
    return data_uri(png_bytes(x, value_range))


def histogram(clean_scores: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict:
    """The clean calibration scores as `bins` equal-width bins: edges (bins + 1) and counts."""
    counts, edges = np.histogram(np.asarray(clean_scores, np.float64), bins=bins)
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist(), "n": int(len(clean_scores))}


def shown_rows(det: Detector) -> list[tuple[int, str, str]]:
    """(row, perturbation key, what it is) of the rows worth a thumbnail: the original, every deterministic
    squeeze, and the first copy of each noise family (nccr-v4 forwards 12 of each; one shows what they look like)."""
    out = [(0, "original", "the input as scored")]
    for p in det.variant.perturbations:
        rows = det.variant.groups[p.key]
        noisy = p.family in RANDOM_FAMILIES
        what = f"copy 1 of {p.copies}" if noisy else "deterministic"
        out.append((rows.start, p.key, what))
    return out


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def explain(det: Detector, x: np.ndarray, decimals: int = 4) -> dict:
    """The material of `x`'s fixed-K verdict: its score, the clean score distribution and threshold, each
    component's z-score and contribution (max combiner: every component, the max marked; logistic: the largest
    weight x z terms, the rest summed), and for images thumbnails of the rows `shown_rows` picks with the
    model's prediction on each."""
    calib = det.calib
    assert calib is not None
    rows = det.rows(x)  # (R, *shape): the rows a fixed-K verdict forwards
    acts = {k: v.reshape(1, len(rows), -1) for k, v in det.forward_rows(rows, np.arange(len(rows)) == 0).items()}
    s = score_rows(det.variant, calib, acts)
    z = zscores(s.raw, calib.comp_mu, calib.comp_sigma, clip=calib.weights is not None)[0]
    names = det.variant.component_names
    r = lambda v: round(float(v), decimals)  # noqa: E731
    if calib.weights is None:
        top = int(np.argmax(z))
        comps = [
            {"name": n, "z": r(z[i]), "contribution": r(z[i]), "max": i == top}
            for i, n in sorted(enumerate(names), key=lambda t: -z[t[0]])
        ]
        combiner = {"kind": "max", "components": comps, "bias": 0.0, "rest": 0.0, "n_components": len(names)}
    else:
        w = np.asarray(calib.weights, np.float64)
        terms = w * z
        order = np.argsort(-np.abs(terms))
        shown = order[:TOP_CONTRIBUTIONS]
        comps = [
            {"name": names[i], "z": r(z[i]), "weight": r(w[i]), "contribution": r(terms[i]), "max": False}
            for i in shown
        ]
        combiner = {
            "kind": "logistic",
            "components": comps,
            "bias": r(calib.bias),
            "rest": r(terms[order[TOP_CONTRIBUTIONS:]].sum()),
            "n_components": len(names),
        }
    out = {
        "score": r(s.score[0]),
        "threshold": r(calib.threshold),
        "rows": len(rows),
        # On CUDA the torch backend draws a verdict's noise copies on the device, seeded by its whole batch:
        # these rows (drawn as on the CPU) then share its squeezes but not its noise draws.
        "rows_as_verdict": not getattr(det.backend, "device_rows", False),
        "combiner": combiner,
        "clean": histogram(calib.clean_scores),
        "thumbnails": [],
    }
    if det.manifest.modality == "image":
        logits = acts["logits"][0]
        labels = det.manifest.labels
        for row, key, what in shown_rows(det):
            pred = int(np.argmax(logits[row])) if np.isfinite(logits[row]).all() else None
            out["thumbnails"].append(
                {
                    "row": row,
                    "perturbation": key,
                    "what": what,
                    "prediction": None if pred is None else labels[pred] if pred < len(labels) else str(pred),
                    "image": png_data_uri(rows[row], tuple(det.manifest.input.range)),
                }
            )
    return out


# The demo attack: PGD-L-inf from the evaluation's attack table (its FGSM budget, scaled by the model's
# attack_scale), but a few steps only: one input, milliseconds to a second on a CPU.
DEMO_STEPS = 10


@dataclass
class DemoAttack:
    """ART PGD on one input against the model's torch module (eval/attacks.py's classifier and runner), loaded
    on first use and kept; one attack at a time per model (`lock`: another meanwhile is a 503)."""

    det: Detector
    lock: threading.Lock
    _clf: object = None

    @classmethod
    def of(cls, det: Detector) -> DemoAttack:
        return cls(det, threading.Lock())

    @staticmethod
    def supported(det: Detector) -> str | None:
        """Why this model cannot be attacked here (None: it can): image models with torch weights only."""
        m = det.manifest
        if m.modality != "image":
            return f"model {m.name} takes {m.modality}: the demo attack is for image models"
        if not (m.weights.torchscript or (m.weights.torch_module and m.weights.state_dict)):
            return f"model {m.name} has no torch weights to take gradients of"
        return None

    @property
    def spec(self):
        from nccr_guard.eval.attacks import AttackSpec, attack_table

        eps = float(attack_table(self.det.manifest)["fgsm"].params["eps"])
        return AttackSpec("pgd", {"norm": "inf", "eps": eps, "eps_step": eps / 4, "max_iter": DEMO_STEPS})

    def classifier(self):
        if self._clf is None:
            import torch

            from nccr_guard.backends.torch_backend import load_module
            from nccr_guard.eval.attacks import art_classifier

            logging.getLogger("art").setLevel(logging.WARNING)  # ART logs each attack's success rate at INFO
            m, det = self.det.manifest, self.det
            module = load_module(m)
            if not det._identity:  # the network takes normalised inputs; the attack works in input space
                mean, std = torch.from_numpy(det._mean), torch.from_numpy(det._std)
                module = _normalised(module, mean, std)
            self._clf = art_classifier(module, tuple(m.input.shape), len(m.labels), tuple(m.input.range))
        return self._clf

    def run(self, x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict]:
        """The adversarial version of `x` (same shape, in the input range) and what made it."""
        from nccr_guard.eval.attacks import run_attack

        spec = self.spec
        # Refused while another runs, not queued: waiting attacks would each hold a worker thread.
        if not self.lock.acquire(blocking=False):
            raise InputError(f"an attack on model {self.det.manifest.name} is running; retry shortly", 503, "busy")
        try:
            adv = run_attack("pgd", self.classifier(), x[None].astype(np.float32), seed, {"pgd": spec})[0]
        finally:
            self.lock.release()
        lo, hi = self.det.manifest.input.range
        adv = np.clip(adv, lo, hi)
        return adv, {"name": "PGD (L-inf, ART)", **spec.params, "l_inf": round(float(np.abs(adv - x).max()), 4)}


def _normalised(module, mean, std):
    """`module` behind the manifest's normalisation, so that ART's gradients and clipping are in input space."""
    import torch

    class Normalised(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, x):
            return self.inner((x - mean) / std)

    return Normalised().eval()
