"""Engine overhead and the two ways to forward fewer rows, in one process and one run (1 thread):

- overhead: detections/s of Detector.detect (row building + one forward + scoring) against a bare forward of the
  same, prebuilt rows (default MNIST model, both backends), timed in alternating slices (ratio = median of the
  slices' ratios); on ONNX the default verdict runs as one graph (backends/onnx_verdict.py), and the numpy
  engine around the forward (`--no-fuse`) is timed against the same bare forward too (`unfused_ratio`); on torch,
  whose one-function verdict (backends/torch_verdict.py) is on only with CUDA, that function on the CPU
  (`fused_ratio`: why it is off here);
- truncated vs full forward: cost of one verdict's rows under `hidden-change` (copies read at a hidden layer),
  MNIST watching conv2 and a ResNet-50-shaped net (random weights) at 224 px watching layer2, torch and ONNX;
- sequential vs fixed K: rows and milliseconds per verdict of the speaker model (its default variant) on held-out
  clean clips, sequential testing on and off, and under the previous default schedule (a uniform
  first round, 1/2/2), in the same run.

- the engine's own parts per call (building the rows, turning activations into verdicts), best of 7 timeit
  repeats on fixed inputs, so a change to either can be measured apart from the forward's noise
  (`--parts-only` prints just these; run it with PYTHONPATH=<other checkout>/service to compare versions).

    python -m bench.engine [--seconds 5] [--parts-only]   ->  reports/bench/engine.json
    python -m bench.engine --variant nccr-v3-median        ->  reports/bench/engine-nccr-v3-median.json

`--variant` times the overhead part alone for another MNIST variant, calibrated in memory on the calibration
split as `nccr-guard calibrate --variant` would fit it.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import ROOT, median_ms, resnet_folder, sample_inputs, write_report
from nccr_guard.detector import Detector
from nccr_guard.engine import get_variant
from nccr_guard.engine.variants import Schedule

MODEL = ROOT / "models" / "mnist"
SPEAKER = ROOT / "models" / "speaker"


def rate(fn, per: int, seconds: float) -> float:
    fn()
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        done += per
    return done / elapsed


def paired_rates(bare, engine, per: int, seconds: float, slices: int = 10) -> tuple[float, float, float]:
    """Median rates of `bare` and `engine` and the median of their ratio, timed in alternating short slices so
    that drift in a shared machine's speed hits both sides alike."""
    pairs = [
        (rate(bare, per, seconds / (2 * slices)), rate(engine, per, seconds / (2 * slices))) for _ in range(slices)
    ]
    b, e = zip(*pairs, strict=True)
    return float(np.median(b)), float(np.median(e)), float(np.median([y / x for x, y in pairs]))


def parts_us(det: Detector, batch: list[np.ndarray]) -> dict[str, float]:
    """Microseconds per call of the engine's own work besides the forward, best of 7 repeats."""
    import timeit

    acts = det.activations(batch)
    out = {}
    for name, fn in (("rows", lambda: det.batch_rows(batch)), ("verdicts", lambda: det.verdicts(acts))):
        out[name] = round(min(timeit.repeat(fn, number=200, repeat=7)) / 200 * 1e6, 1)
    return out


def watching(src: Path, dst: Path, layer: str) -> Path:
    """A copy of model folder `src` (weights, no calibration) watching `layer` instead."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix in (".pt", ".onnx"):
            shutil.copy(f, dst / f.name)
    toml = (src / "model.toml").read_text()
    watch = next(line for line in toml.splitlines() if line.startswith("watch = "))
    (dst / "model.toml").write_text(
        toml.replace(watch, f'watch = ["{layer}"]').replace('calibration = "calibration.npz"\n', "")
    )
    return dst


def truncation(reps: int) -> list[dict]:
    """ms per verdict's rows (hidden-change: 8 rows, 7 of them copies), copies truncated vs the full network."""
    from nccr_guard.export import export_onnx

    rng = np.random.default_rng(0)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [
            (
                "mnist 28x28",
                watching(MODEL, tmp / "mnist-conv2", "conv2"),
                "conv2",
                rng.random((1, 28, 28), np.float32),
            ),
        ]
        res = resnet_folder(tmp)
        cases.append(
            (
                "resnet50 224x224",
                watching(res, tmp / "resnet-layer2", "layer2"),
                "layer2",
                rng.random((3, 224, 224), np.float32),
            )
        )
        for name, folder, layer, x in cases:
            det = Detector.load(folder, backend="torch", device="cpu", threads=1, calibrated=False)
            onnx_file = folder / "model.onnx"
            export_onnx(det.backend.module, onnx_file, tuple(x.shape), [layer])
            toml = (folder / "model.toml").read_text()
            (folder / "model.toml").write_text(
                toml.replace("[weights]\n", '[weights]\nonnx = "model.onnx"\n', 1) if "onnx =" not in toml else toml
            )
            for backend in ("torch", "onnx"):
                det = Detector.load(folder, backend=backend, device="cpu", threads=1, calibrated=False)
                det.variant = get_variant("hidden-change")
                n = reps if "resnet" not in name else max(3, reps // 10)
                det.use_truncation = False
                full = median_ms(lambda det=det, x=x: det.activations([x]), n)
                det.use_truncation = True
                cut = median_ms(lambda det=det, x=x: det.activations([x]), n)
                out.append(
                    {
                        "input": name,
                        "backend": backend,
                        "watched": layer,
                        "rows": det.variant.rows,
                        "full_ms": round(full, 3),
                        "truncated_ms": round(cut, 3),
                        "ratio": round(cut / full, 3),
                    }
                )
                print(out[-1], flush=True)
    return out


PREVIOUS_SCHEDULE = Schedule(first=1, step=2, z=2.0)  # nccr-audio-v2's default before its current one


def sequential(n: int) -> dict:
    """Speaker verdicts on `n` held-out clean clips: rows and ms, sequential testing on vs off (same clips)."""
    from nccr_guard.datasets import load_split

    det = Detector.load(SPEAKER, backend="torch", device="cpu", threads=1)
    xs, _ = load_split(det.manifest, "test")
    xs = xs[np.linspace(0, len(xs) - 1, n).astype(int)]
    out = {"model": "speaker", "variant": det.variant.name, "clips": n, "schedule": det.variant.sequential.__dict__}
    default = det.variant
    previous = dataclasses.replace(default, sequential=PREVIOUS_SCHEDULE)
    for key, on, variant in (("fixed", False, default), ("sequential", True, default), ("previous", True, previous)):
        det.use_sequential, det.variant = on, variant
        det.detect(xs[:1])
        t = time.perf_counter()
        verdicts = det.detect(list(xs), chunk=1)
        ms = 1e3 * (time.perf_counter() - t) / n
        out[key] = {
            "mean_rows": float(np.mean([v.passes for v in verdicts])),
            "ms_per_verdict": round(ms, 1),
            "flagged": int(sum(v.adversarial for v in verdicts)),
        }
        print(key, out[key], flush=True)
    det.variant = default
    out["previous"]["schedule"] = PREVIOUS_SCHEDULE.__dict__
    out["rows_ratio"] = out["sequential"]["mean_rows"] / out["fixed"]["mean_rows"]
    out["time_ratio"] = out["sequential"]["ms_per_verdict"] / out["fixed"]["ms_per_verdict"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30, help="repetitions of each truncation timing")
    ap.add_argument("--clips", type=int, default=40, help="held-out clips for the sequential timing")
    ap.add_argument("--parts-only", action="store_true", help="only time the engine's parts (ONNX), write nothing")
    ap.add_argument("--variant", help="the overhead part alone, for this MNIST variant (calibrated in memory)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    xs = sample_inputs(MODEL, 64)
    if args.parts_only:
        det = Detector.load(MODEL, backend="onnx", device="cpu", threads=args.threads)
        for per in (1, 8, 32):
            print(f"{per} inputs: {parts_us(det, list(xs[:per]))} us per call", flush=True)
        return
    results = []
    swap = None
    if args.variant:
        from nccr_guard.calibrate import calibrate

        swap = get_variant(args.variant), calibrate(MODEL, variant=args.variant, write=False, backend="onnx")
    for backend in ("torch", "onnx"):
        det = Detector.load(MODEL, backend=backend, device="cpu", threads=args.threads)
        if swap:
            det.variant, det.calib = swap
        # the other engine, timed against the same bare forward: the numpy engine where the default runs as one
        # graph (ONNX), the one-function verdict where the default does not (torch on the CPU)
        other = Detector.load(MODEL, backend=backend, device="cpu", threads=args.threads, fuse=not det.fused)
        if swap:
            other.variant, other.calib = swap
        if other.use_fused:  # torch: switched on as on CUDA
            other.backend.fuses_verdicts = True
        tag = "unfused" if det.fused else "fused"
        for per in (1, 8, 32):
            batch = list(xs[:per])
            rows = det.batch_rows(batch).reshape(-1, *det.manifest.input.shape)
            bare_fn = lambda rows=rows, det=det: det.forward(rows)  # noqa: E731
            bare, full, ratio = paired_rates(bare_fn, lambda b=batch, d=det: d.detect(b), per, 2 * args.seconds)
            results.append(
                {
                    "backend": backend,
                    "variant": det.variant.name,
                    "fused": det.fused,
                    "inputs_per_forward": per,
                    "rows_per_forward": len(rows),
                    "bare_forward_det_per_s": round(bare, 1),
                    "engine_det_per_s": round(full, 1),
                    "ratio": round(ratio, 3),
                    "engine_parts_us": parts_us(det, batch),
                }
            )
            if other.fused != det.fused:
                _, alt, a_ratio = paired_rates(bare_fn, lambda b=batch, o=other: o.detect(b), per, 2 * args.seconds)
                results[-1].update({f"{tag}_engine_det_per_s": round(alt, 1), f"{tag}_ratio": round(a_ratio, 3)})
            print(results[-1], flush=True)
    if args.variant:
        name = f"engine-{args.variant}"
        cmd = "python -m bench.engine " + " ".join(sys.argv[1:])
        write_report(name, {"threads": args.threads, "results": results}, cmd)
        print(
            f"{name}: engine/bare "
            + "; ".join(
                f"{b} {'/'.join(str(r['ratio']) for r in results if r['backend'] == b)} "
                f"({'/'.join(str(r.get('unfused_ratio', r.get('fused_ratio'))) for r in results if r['backend'] == b)}"
                f" {'unfused' if b == 'onnx' else 'fused'}) at 1/8/32 inputs"
                for b in ("onnx", "torch")
            )
        )
        return
    trunc = truncation(args.reps)
    seq = sequential(args.clips)
    write_report(
        "engine",
        {"threads": args.threads, "results": results, "goal_ratio": 0.95, "truncation": trunc, "sequential": seq},
        "python -m bench.engine " + " ".join(sys.argv[1:]),
    )
    best = max(results, key=lambda r: r["engine_det_per_s"])
    res = [t["ratio"] for t in trunc if "resnet" in t["input"]]
    print(
        f"engine: best {best['engine_det_per_s']:.0f} det/s ({best['backend']}, {best['inputs_per_forward']}/fwd), "
        f"engine/bare ratio {min(r['ratio'] for r in results):.2f}-{max(r['ratio'] for r in results):.2f} (goal 0.95; "
        f"ONNX unfused {'/'.join(str(r.get('unfused_ratio')) for r in results if r['backend'] == 'onnx')}, "
        f"torch fused {'/'.join(str(r.get('fused_ratio')) for r in results if r['backend'] == 'torch')}); "
        f"truncated/full ResNet-50 {min(res):.2f}-{max(res):.2f}; sequential speaker rows "
        f"{seq['sequential']['mean_rows']:.1f}/{seq['fixed']['mean_rows']:.0f} = {seq['rows_ratio']:.2f}, "
        f"time {seq['time_ratio']:.2f} (previous schedule: rows {seq['previous']['mean_rows']:.1f}, "
        f"{seq['previous']['ms_per_verdict'] / seq['fixed']['ms_per_verdict']:.2f} of fixed K's time)"
    )


if __name__ == "__main__":
    main()
