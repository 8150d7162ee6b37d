"""Engine overhead: detections/s of Detector.detect (row building + one forward + scoring) against a bare
forward of the same, prebuilt rows, in one process and one run.

    python -m bench.engine [--seconds 5]   ->  reports/bench/engine.json
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from bench.common import ROOT, sample_inputs, write_report
from nccr_guard.detector import Detector

MODEL = ROOT / "models" / "mnist"


def rate(fn, per: int, seconds: float) -> float:
    fn()
    done, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        fn()
        done += per
    return done / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    xs = sample_inputs(MODEL, 64)
    results = []
    for backend in ("torch", "onnx"):
        det = Detector.load(MODEL, backend=backend, device="cpu", threads=args.threads)
        for per in (1, 8, 32):
            batch = list(xs[:per])
            rows = np.concatenate([det.rows(x) for x in batch])
            bare = rate(lambda rows=rows, det=det: det.forward(rows), per, args.seconds)
            full = rate(lambda batch=batch, det=det: det.detect(batch), per, args.seconds)
            results.append(
                {
                    "backend": backend,
                    "inputs_per_forward": per,
                    "rows_per_forward": len(rows),
                    "bare_forward_det_per_s": bare,
                    "engine_det_per_s": full,
                    "ratio": full / bare,
                }
            )
            print(results[-1], flush=True)
    write_report(
        "engine",
        {"threads": args.threads, "results": results, "goal_ratio": 0.95},
        "python -m bench.engine " + " ".join(sys.argv[1:]),
    )
    best = max(results, key=lambda r: r["engine_det_per_s"])
    print(
        f"engine: best {best['engine_det_per_s']:.0f} det/s ({best['backend']}, {best['inputs_per_forward']}/fwd), "
        f"engine/bare ratio {min(r['ratio'] for r in results):.2f}-{max(r['ratio'] for r in results):.2f} (goal 0.95)"
    )


if __name__ == "__main__":
    main()
