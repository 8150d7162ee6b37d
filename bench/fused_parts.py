"""Where the one-graph verdict's time goes beyond the bare forward (default MNIST model, ONNX, 1 thread): the
same ONNX Runtime graph built whole, with only its rows end (input -> squeezed rows -> model -> logits), with
only its scoring end (rows -> model -> scores), and bare (rows -> model -> logits); and `Detector.detect`, whose
excess over its own run of the whole graph is the Python around it (input check, result arrays to verdict
objects). Timed in alternating rounds, median of the rounds, at 1, 8 and 32 inputs per call. Each graph is its own
ONNX Runtime session, so the differences between sessions carry a few microseconds of placement noise.

    python -m bench.fused_parts [--rounds 9]  ->  reports/bench/fused-parts.json

Why: bench.engine measures the engine at 0.8x a bare forward at one input and ~0.93x at 8-32 (goal 0.95);
this splits that gap into the rows (bit-depth squeezes, a handful of elementwise nodes), the scoring (~30 small
nodes) and Python, so a change to any one can be measured apart (its report keeps the parts' sum against the
whole graph: their interaction)."""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
import onnx
import onnxruntime as ort

from bench.common import ROOT, sample_inputs, write_report
from bench.engine import rate
from nccr_guard.backends.onnx_verdict import INPUT, fuse
from nccr_guard.detector import Detector

MODEL = ROOT / "models" / "mnist"


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--ms", type=float, default=150.0, help="time per case and round")
    args = ap.parse_args()
    det = Detector.load(MODEL, backend="onnx", device="cpu", threads=1)
    assert det.fused, "the default MNIST detector no longer runs as one graph"
    shape = list(det.manifest.input.shape)
    path = det.manifest.path(det.manifest.weights.onnx)
    plain = onnx.load(path)
    feed_name = next(i.name for i in plain.graph.input if i.name not in {x.name for x in plain.graph.initializer})
    spec = det.verdict_spec(classes=det.forward(np.zeros((1, *shape), np.float32))["logits"].shape[-1])
    graphs = {
        "bare": (plain, False),
        "rows_and_model": (fuse(onnx.load(path), spec, shape, scores=False), True),
        "model_and_scores": (fuse(onnx.load(path), spec, shape, rows=False), False),
    }
    sessions = {k: (session(g), INPUT if on_inputs else feed_name, on_inputs) for k, (g, on_inputs) in graphs.items()}
    whole = det._fused_run()  # the detector's own graph session: `detect` minus this is Python only
    xs = sample_inputs(MODEL, 32)
    results = []
    for per in (1, 8, 32):
        batch = np.ascontiguousarray(xs[:per], np.float32)
        rows = det.batch_rows(list(batch)).reshape(-1, *shape).astype(np.float32)
        calls = {k: (lambda s=s, f={n: batch if on else rows}: s.run(None, f)) for k, (s, n, on) in sessions.items()}
        calls["whole"] = lambda b=batch: whole(b)
        calls["detect"] = lambda b=batch: det.detect(b)
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(args.rounds):
            for k, fn in calls.items():
                times[k].append(1e6 / rate(fn, 1, args.ms / 1e3))
        us = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "inputs": per,
            "rows": len(rows),
            "us": {k: round(v, 1) for k, v in us.items()},
            "rows_end_us": round(us["rows_and_model"] - us["bare"], 1),
            "scores_end_us": round(us["model_and_scores"] - us["bare"], 1),
            "graph_over_bare_us": round(us["whole"] - us["bare"], 1),
            "python_us": round(us["detect"] - us["whole"], 1),
            "bare_over_detect": round(us["bare"] / us["detect"], 3),
        }
        results.append(row)
        print(row, flush=True)
    command = "python -m bench.fused_parts " + " ".join(sys.argv[1:])
    write_report("fused-parts", {"rounds": args.rounds, "ms_per_case": args.ms, "results": results}, command)
    print(
        "fused parts (us at "
        + " / ".join(str(r["inputs"]) for r in results)
        + " inputs): rows end "
        + " / ".join(str(r["rows_end_us"]) for r in results)
        + ", scoring end "
        + " / ".join(str(r["scores_end_us"]) for r in results)
        + ", whole graph over bare "
        + " / ".join(str(r["graph_over_bare_us"]) for r in results)
        + ", Python "
        + " / ".join(str(r["python_us"]) for r in results)
        + "; bare / detect "
        + " / ".join(str(r["bare_over_detect"]) for r in results)
    )


if __name__ == "__main__":
    main()
