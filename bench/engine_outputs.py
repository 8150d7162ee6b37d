"""Every engine output on fixed inputs, to show that a speed change to the engine changes no bit.

Records, on the committed models: verdicts of 300 held-out MNIST digits (ONNX, the one-graph verdict and the
numpy engine) and 64 (torch), whole and in batches of 7; one batch's rows; for every registered variant (K=4
for noise families) on 120 digits its rows, a calibration fitted on 80 and the scores of 40; nccr-v3-median's
verdicts of the 300 digits under that calibration (ONNX: one graph); the speaker model's
sequential verdicts on 6 clips (whole and in chunks of 4) and fixed-K verdicts on 3.
Run it on two checkouts and compare:

    PYTHONPATH=<other checkout>/service python -m bench.engine_outputs --write /tmp/before.pkl
    python -m bench.engine_outputs --against /tmp/before.pkl     # exit 1 and the differing keys if any differ

A differing record shows its largest float difference where only float values differ (a last-bit change reads as
~1e-16), records on one side only are listed apart (a checkout older than a record's path).
"""

from __future__ import annotations

import argparse
import inspect
import pickle
import sys
import zlib
from pathlib import Path

import numpy as np

from bench.common import ROOT, sample_inputs
from nccr_guard.detector import Detector
from nccr_guard.engine import build_batch, fit_calibration, score_rows
from nccr_guard.engine.variants import RANDOM_FAMILIES, VARIANTS

MNIST, SPEAKER = ROOT / "models" / "mnist", ROOT / "models" / "speaker"


FIELDS = ("verdict", "score", "threshold", "p_value", "index", "label", "confidence", "passes", "components")


def fields(v) -> dict:
    """A verdict as a dict of what it says, the same for every version of Verdict (a dataclass with a
    `components` dict in older checkouts, slotted with `components` a property now)."""
    return {k: getattr(v, k) for k in FIELDS}


def outputs() -> dict:
    out: dict = {}
    xs = sample_inputs(MNIST, 300)
    # the numpy engine, which the default ONNX verdict replaced, apart (a checkout from before it has no `fuse`)
    unfused = [("onnx-unfused", "onnx", 300, {"fuse": False})]
    if "fuse" not in inspect.signature(Detector.load).parameters:
        unfused = []
    for key, backend, n, opts in [("onnx", "onnx", 300, {}), *unfused, ("torch", "torch", 64, {})]:
        det = Detector.load(MNIST, backend=backend, device="cpu", threads=1, **opts)
        out[f"mnist-{key}"] = [fields(v) for v in det.detect(list(xs[:n]))]
        out[f"mnist-{key}-by-7"] = [fields(v) for i in range(0, n, 7) for v in det.detect(list(xs[i : i + 7]))]
        out[f"mnist-{key}-rows"] = det.batch_rows(list(xs[:16]))
    bare = Detector.load(MNIST, backend="onnx", device="cpu", threads=1, calibrated=False)
    part = xs[:120]
    for name, variant in VARIANTS.items():
        v = variant.with_k(4) if any(p.family in RANDOM_FAMILIES for p in variant.perturbations) else variant
        rngs = [np.random.default_rng([0, zlib.crc32(x.tobytes())]) for x in part]
        rows = build_batch(part, v.perturbations, rngs, (0.0, 1.0))
        acts = {k: a.reshape(len(part), v.rows, -1) for k, a in bare.forward(rows.reshape(-1, 1, 28, 28)).items()}

        def cut(lo: int, hi: int, acts: dict = acts) -> dict:
            return {k: a[lo:hi] for k, a in acts.items()}

        calib = fit_calibration(v, cut(0, 40), cut(40, 80), 10)
        s = score_rows(v, calib, cut(80, 120))
        out[f"variant-{name}"] = [rows, s.score, s.raw, s.prediction, s.confidence, calib.threshold, calib.comp_mu]
        out[f"variant-{name}-meta"] = calib.meta
        if name == "nccr-v3-median":
            det = Detector.load(MNIST, backend="onnx", device="cpu", threads=1)
            det.variant, det.calib = v, calib
            out["mnist-onnx-nccr-v3-median"] = [fields(verdict) for verdict in det.detect(list(xs))]
    clips = list(sample_inputs(SPEAKER, 6))
    sp = Detector.load(SPEAKER, backend="torch", device="cpu", threads=1)
    out["speaker"] = [fields(v) for v in sp.detect(clips)]
    out["speaker-chunks-of-4"] = [fields(v) for v in sp.detect(clips, chunk=4)]
    fixed = Detector.load(SPEAKER, backend="torch", device="cpu", threads=1, sequential=False)
    out["speaker-fixed"] = [fields(v) for v in fixed.detect(clips[:3])]
    return out


def same(a, b) -> bool:
    """Bit for bit: arrays by dtype, shape and value (NaN equal to NaN), floats exactly."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and (a.dtype, a.shape) == (b.dtype, b.shape)
            and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
        )
    if isinstance(a, float) and np.isnan(a):
        return isinstance(b, float) and np.isnan(b)
    return type(a) is type(b) and a == b


def largest_gap(a, b) -> float | None:
    """The largest |a - b| over the float values of two records of the same structure; None if anything but
    float values differs (keys, lengths, labels, verdicts)."""
    if isinstance(a, dict):
        ok = isinstance(b, dict) and a.keys() == b.keys()
        return _worst([largest_gap(a[k], b[k]) for k in a]) if ok else None
    if isinstance(a, list | tuple):
        ok = isinstance(b, list | tuple) and len(a) == len(b)
        return _worst([largest_gap(x, y) for x, y in zip(a, b, strict=True)]) if ok else None
    if isinstance(a, np.ndarray) and a.dtype.kind == "f":
        ok = isinstance(b, np.ndarray) and (a.dtype, a.shape) == (b.dtype, b.shape)
        return float(np.nanmax(np.abs(a - b), initial=0.0)) if ok else None
    if isinstance(a, float) and isinstance(b, float):
        return 0.0 if same(a, b) else abs(a - b)
    return 0.0 if same(a, b) else None


def _worst(gaps: list[float | None]) -> float | None:
    return None if any(g is None for g in gaps) else max(gaps, default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", type=Path, help="record this checkout's outputs here (a pickle)")
    what.add_argument("--against", type=Path, help="compare this checkout's outputs with a recorded pickle")
    args = ap.parse_args()
    now = outputs()
    if args.write:
        args.write.write_bytes(pickle.dumps(now))
        print(f"engine outputs: {len(now)} records written to {args.write}")
        return
    before = pickle.loads(args.against.read_bytes())  # a file this script wrote
    one_side = sorted(before.keys() ^ now.keys())
    differ = sorted(k for k in before.keys() & now.keys() if not same(before[k], now[k]))
    gaps = [(k, largest_gap(before[k], now[k])) for k in differ]
    shown = [k if g is None else f"{k} (floats only, largest |difference| {g:.3g})" for k, g in gaps]
    print(f"engine outputs: {len(now)} records, {len(differ)} differ" + (f": {', '.join(shown)}" if differ else ""))
    if one_side:
        print(f"in one checkout only: {', '.join(one_side)}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
