"""GPU checks and benchmarks, run on a machine with an NVIDIA GPU (bench/gpu.sh sets up the environment).

    python -m bench.gpu [--seconds 6] [--only STEP ...] [--out DIR]   ->  reports/bench/gpu-<device>.json

The report is rewritten after every step, in this order: correctness, graphs, resnet50_k32, onnx_runtime,
speaker, mnist_engine, engine_profile, serve (the issue's headline number third, so that a run cut short by a
lent machine's time limit still has it; pass `--out $OUT` there).

0. graphs: CUDA-graph replays against eager forwards (full and truncated, fp32 and fp16, several batch sizes);
1. correctness: the default model's scores on CUDA (fp32, and fp16; CUDA graphs on, the default) against CPU
   on 100 held-out digits, and whether the graphs passed their capture check; `speaker`: the speaker model on
   CUDA against CPU on held-out clips, sequential (rows built on the host) and fixed K (rows built on the
   device, whose noise differs from the host's), and whether its LSTM captured as a graph;
2. MNIST engine: detections/s against inputs per forward, split into row building (CPU), forward, scoring,
   with and without CUDA graphs; engine_profile: torch.profiler's top operators around those detections;
3. ResNet-50-shaped model (random weights, 224 px, K=32): p50/p99 latency of one verdict, fp32 and fp16, with
   and without CUDA graphs; onnx_runtime: the execution providers the installed onnxruntime offers and, where
   CUDA is one, the default model's ONNX scores on CUDA against the CPU;
4. the HTTP service on CUDA at saturation (closed-loop clients in several processes, bench/loadgen.py: there is
   no wrk there), with and without CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.common import REPORTS, ROOT, machine, resnet_folder, sample_inputs, start_server
from bench.loadgen import closed_loop
from bench.serve import forwards

MNIST = ROOT / "models" / "mnist"
SPEAKER = ROOT / "models" / "speaker"


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def agreement(ref: list, got: list) -> dict:
    """How far verdicts `got` (on the device) stray from `ref` (on the CPU) for the same inputs."""
    diff = np.abs(np.array([v.score for v in ref]) - np.array([v.score for v in got]))
    return {
        "max_abs_score_diff": float(diff.max()),
        "median_abs_score_diff": float(np.median(diff)),
        "same_prediction": float(np.mean([a.index == b.index for a, b in zip(ref, got, strict=True)])),
        "same_verdict": float(np.mean([a.verdict == b.verdict for a, b in zip(ref, got, strict=True)])),
    }


def correctness() -> dict:
    """The default MNIST variant on the device (fp32, fp16) against the CPU, and nccr-v3-median (fp32; its
    one-function verdict too: a median row and a `change` component), calibrated in memory."""
    from nccr_guard.calibrate import calibrate
    from nccr_guard.detector import Detector
    from nccr_guard.engine import get_variant

    def load(device: str, half: bool = False, swap: tuple | None = None) -> Detector:
        det = Detector.load(MNIST, backend="torch", device=device, half=half)
        if swap:
            det.variant, det.calib = swap
        return det

    xs = list(sample_inputs(MNIST, 100))
    median = get_variant("nccr-v3-median"), calibrate(MNIST, variant="nccr-v3-median", write=False, backend="onnx")
    cpu = {None: load("cpu").detect(xs), "median": load("cpu", swap=median).detect(xs)}  # each reference once
    res = {}
    for key, half, swap in (("fp32", False, None), ("fp16", True, None), ("nccr-v3-median-fp32", False, "median")):
        det = load(DEVICE, half, median if swap else None)
        got = det.detect(xs)
        res[key] = {"cuda_graphs": det.backend.cuda_graphs, "fused": det.fused, **agreement(cpu[swap], got)}
    return res


def speaker(clips: int = 12) -> dict:
    """The speaker model on the device against the CPU, sequential testing on and off."""
    from nccr_guard.detector import Detector

    try:
        xs, source = list(sample_inputs(SPEAKER, clips)), "test split"
    except Exception:  # no espeak-ng / festival to synthesise the corpus there: seeded noise at speech level
        from nccr_guard.manifest import load_manifest

        shape = (clips, *load_manifest(SPEAKER).input.shape)
        xs = list((np.random.default_rng(0).standard_normal(shape) * 0.05).astype(np.float32))
        source = "seeded noise (no speech corpus on this machine)"
    res: dict = {"clips": source}
    for sequential in (True, False):
        cpu = Detector.load(SPEAKER, device="cpu", sequential=sequential).detect(xs)
        det = Detector.load(SPEAKER, device=DEVICE, sequential=sequential)
        t = time.perf_counter()
        dev = det.detect(xs)
        first = time.perf_counter() - t
        # The first call captures the CUDA graphs and autotunes cuDNN: kept apart, not the steady state.
        t = time.perf_counter()
        det.detect(xs)
        seconds = time.perf_counter() - t
        res["sequential" if sequential else "fixed_k"] = {
            "cuda_graphs": det.backend.cuda_graphs,
            "ms_per_clip": round(seconds / clips * 1e3, 2),
            "first_call_ms_per_clip": round(first / clips * 1e3, 2),
            "mean_passes": float(np.mean([v.passes for v in dev])),
            **agreement(cpu, dev),
        }
    return res


def graphs() -> dict:
    """CUDA graphs against eager forwards on the device: the default model's full forward and a copy of it
    watching conv2 whose copies run truncated, fp32 and fp16, at batch sizes that hit a bucket exactly, need
    padding, and exceed the largest bucket (eager). Largest |difference| per output and whether graphs stayed on."""
    from bench.engine import watching
    from nccr_guard.backends.torch_backend import TorchBackend
    from nccr_guard.manifest import load_manifest

    xs = sample_inputs(MNIST, 300)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = watching(MNIST, Path(tmp) / "conv2", "conv2")
        for half in (False, True):
            m = load_manifest(folder)
            graphed = TorchBackend(m, device=DEVICE, half=half)
            eager = TorchBackend(m, device=DEVICE, half=half, cuda_graphs=False)
            worst: dict[str, float] = {}
            for n in (1, 5, 8, 33, 256, 300):
                for upto in (None, ["conv2"]):
                    a, b = graphed.forward(xs[:n], upto), eager.forward(xs[:n], upto)
                    for k in b:
                        key = f"{k}{'-truncated' if upto else ''}"
                        worst[key] = max(worst.get(key, 0.0), float(np.abs(a[k] - b[k]).max()))
            out["fp16" if half else "fp32"] = {
                "cuda_graphs": graphed.cuda_graphs,
                "graphs_captured": len(graphed.graphs.graphs) if graphed.graphs else 0,
                "max_abs_diff": worst,
                "replay_ms_33_rows": float(np.median(timed(lambda g=graphed: g.forward(xs[:33]), 50))) * 1e3,
                "eager_ms_33_rows": float(np.median(timed(lambda e=eager: e.forward(xs[:33]), 50))) * 1e3,
            }
    return out


def engine_split(det, xs: np.ndarray, per: int, reps: int) -> dict:
    """Per-call time of each stage for `per` inputs per forward."""
    from nccr_guard.engine import score_rows

    batch = list(xs[:per]) if per <= len(xs) else [xs[i % len(xs)] for i in range(per)]
    t0 = time.perf_counter()
    for _ in range(reps):
        rows = det.batch_rows(batch).reshape(-1, *det.manifest.input.shape)
    t_rows = (time.perf_counter() - t0) / reps
    fwd = timed(lambda: det.forward(rows), reps)
    acts = det.forward(rows)
    acts = {k: v.reshape(per, det.rows_per_input, -1) for k, v in acts.items()}
    t0 = time.perf_counter()
    for _ in range(reps):
        score_rows(det.variant, det.calib, acts)
    t_score = (time.perf_counter() - t0) / reps
    total = timed(lambda: det.detect(batch), reps)
    return {
        "inputs_per_forward": per,
        "rows_per_forward": per * det.rows_per_input,
        "rows_ms": t_rows * 1e3,
        "forward_ms": float(np.median(fwd)) * 1e3,
        "score_ms": t_score * 1e3,
        "detect_ms": float(np.median(total)) * 1e3,
        "detections_per_s": per / float(np.median(total)),
        "forward_over_detect": float(np.median(fwd)) / float(np.median(total)),  # the engine ratio (0.95)
    }


def onnx_runtime() -> dict:
    """ONNX Runtime on the device: which execution providers this onnxruntime build offers, and where the CUDA one
    is there, the default model's ONNX scores on CUDA against the CPU and detections/s at 1 and 32 inputs."""
    import onnxruntime as ort

    from nccr_guard.detector import Detector

    res: dict = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    if "CUDAExecutionProvider" not in res["providers"]:
        res["cuda"] = "not offered by this onnxruntime build (the CUDA provider ships in onnxruntime-gpu)"
        return res
    xs = list(sample_inputs(MNIST, 100))
    cpu = Detector.load(MNIST, backend="onnx", device="cpu").detect(xs)
    det = Detector.load(MNIST, backend="onnx", device=DEVICE)
    res["device"] = det.backend.device
    res["agreement"] = agreement(cpu, det.detect(xs))
    for per in (1, 32):
        res[f"detections_per_s_{per}"] = per / float(np.median(timed(lambda n=per: det.detect(xs[:n]), 20)))
    return res


def mnist_engine() -> dict:
    from nccr_guard.detector import Detector

    xs = sample_inputs(MNIST, 128)
    out = {}
    # The default (one-function verdicts in CUDA graphs: backends/torch_verdict.py) against the numpy engine
    # around a graphed forward (the path before it) and both eagerly; forward_ms is the bare forward of the rows.
    for name, graphs, fuse in (
        ("cuda_graphs", True, True),
        ("cuda_graphs_unfused", True, False),
        ("eager", False, True),
        ("eager_unfused", False, False),
    ):
        det = Detector.load(MNIST, backend="torch", device=DEVICE, cuda_graphs=graphs, fuse=fuse)
        det.detect(list(xs[:8]))
        runs = [engine_split(det, xs, per, 20) for per in (1, 8, 32, 128, 512)]
        out[name] = {"active": det.backend.cuda_graphs, "fused": det.fused, "runs": runs}
    return out


def engine_profile(calls: int = 50) -> dict:
    """Where a detection's time goes around the forward on the device: torch.profiler over `calls` detections of
    the default model at 1 and at 32 inputs per call, the top operators by host time (a device->host copy shows
    its synchronisation here) and the device's busy time against the wall: where the engine's time goes beyond
    the bare forward (docs/decisions/002-one-graph-verdict.md)."""
    from torch.profiler import ProfilerActivity, profile

    from nccr_guard.detector import Detector

    xs = sample_inputs(MNIST, 32)
    det = Detector.load(MNIST, backend="torch", device=DEVICE)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    out: dict = {"fused": det.fused}
    for per in (1, 32):
        batch = list(xs[:per])
        for _ in range(5):
            det.detect(batch)
        wall = sum(timed(lambda b=batch: det.detect(b), calls))  # unprofiled: the profiler's start costs seconds
        with profile(activities=activities) as prof:
            for _ in range(calls):
                det.detect(batch)
            sync()
        events = prof.key_averages()
        device_us = sum(getattr(e, "self_device_time_total", 0.0) for e in events)
        out[f"{per}_inputs"] = {
            "wall_ms_per_detect": wall / calls * 1e3,
            "device_busy_ms_per_detect": device_us / calls / 1e3,
            # wall minus this: Python between the operators (numpy scoring, verdicts, the engine's own code)
            "host_ops_ms_per_detect": sum(e.self_cpu_time_total for e in events) / calls / 1e3,
            "top_ops_by_host_time": [
                {
                    "op": e.key,
                    "calls_per_detect": e.count / calls,
                    "host_us_per_detect": e.cpu_time_total / calls,
                    "host_self_us_per_detect": e.self_cpu_time_total / calls,
                    "device_self_us_per_detect": getattr(e, "self_device_time_total", 0.0) / calls,
                }
                for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:20]
            ],
        }
    return out


def calibrated_resnet(tmp: Path) -> Path:
    from PIL import Image

    from nccr_guard.calibrate import calibrate

    folder = resnet_folder(
        tmp, top='variant = "nccr-v2"\nk = 32\n', image="mean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]\n"
    )
    data = tmp / "clean"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):  # smooth random images: calibration quality is irrelevant for speed
        small = rng.random((8, 8, 3))
        Image.fromarray((small * 255).astype(np.uint8)).resize((224, 224), Image.BILINEAR).save(data / f"{i}.png")
    calibrate(folder, data=data, device=DEVICE)
    return folder


def resnet_latency(folder: Path, reps: int = 60) -> dict:
    from nccr_guard.detector import Detector

    out = {}
    x = np.random.default_rng(1).random((3, 224, 224)).astype(np.float32)
    for half, graphs in ((False, True), (True, True), (False, False), (True, False)):
        det = Detector.load(folder, backend="torch", device=DEVICE, half=half, cuda_graphs=graphs)
        for _ in range(5):
            det.detect([x])
        lat = np.array(timed(lambda det=det: det.detect([x]), reps)) * 1e3
        split = engine_split(det, x[None], 1, 20)
        out[("fp16" if half else "fp32") + ("" if graphs else "-eager")] = {
            "cuda_graphs": det.backend.cuda_graphs,
            "rows": det.rows_per_input,
            "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "split_1_input": split,
            "split_8_inputs": engine_split(det, np.stack([x] * 8), 8, 10),
        }
    return out


def serve_gpu(seconds: float, extra: tuple[str, ...] = (), logs: Path = REPORTS) -> dict:
    from PIL import Image

    port = 18765
    logs.mkdir(parents=True, exist_ok=True)
    proc = start_server(port, ("--device", DEVICE, *extra), log=logs / f"gpu-serve{'-'.join(['', *extra])}.log")
    try:
        buf = BytesIO()
        Image.fromarray((sample_inputs(MNIST, 1)[0, 0] * 255).astype(np.uint8)).save(buf, format="PNG")
        url = f"http://127.0.0.1:{port}/v1/detect"
        clients = max(1, min(8, (os.cpu_count() or 2) // 2))  # the server needs the other cores
        headers = {"content-type": "image/png"}
        runs = [closed_loop(url, buf.getvalue(), headers, c, seconds, clients) for c in (16, 64, 256)]
        batches = forwards(port)  # the MNIST model's (requests, forwards)
        cards = {c["name"]: c for c in httpx.get(f"http://127.0.0.1:{port}/v1/models", trust_env=False).json()}
        model = cards["mnist"]
    finally:
        proc.terminate()
        proc.wait(30)
    return {
        "serve_args": list(extra),
        "runs": runs,
        "peak_rps": max(r["rps"] for r in runs),
        "device": model["device"],
        "cuda_graphs": {name: c["cuda_graphs"] for name, c in cards.items()},
        "batching": model["calibration"]["batching"],
        # The MNIST model's series, not the last model's (the speaker's, one warm-up request: it would say 1.0).
        "mean_batch_requests": batches[0] / batches[1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    ap.add_argument("--only", nargs="*", default=None, help="run only these steps")
    ap.add_argument("--processes", type=int, nargs="*", default=[1], help="server process counts to measure")
    ap.add_argument(
        "--out",
        type=Path,
        default=REPORTS,
        help="folder for the report, rewritten after every step (on a lent machine: $OUT, so that a run cut off "
        "by its time limit still brings back the steps it finished)",
    )
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    assert DEVICE == "cpu" or torch.cuda.is_available(), "no CUDA device"
    report = {"command": "python -m bench.gpu " + " ".join(sys.argv[1:]), "machine": machine()}
    tmp = Path(tempfile.mkdtemp())
    # The headline (ResNet-50 p50 at K=32) right after the checks, so a run cut short still has it.
    steps = [
        ("correctness", correctness),
        ("graphs", graphs),
        ("resnet50_k32", lambda: resnet_latency(calibrated_resnet(tmp))),
        ("onnx_runtime", onnx_runtime),
        ("speaker", speaker),
        ("mnist_engine", mnist_engine),
        ("engine_profile", engine_profile),
        (
            "serve",
            lambda: [
                serve_gpu(args.seconds, ("--processes", str(n), *graphs), args.out)
                for n in args.processes
                for graphs in ((), ("--no-cuda-graphs",))
            ],
        ),
    ]
    dev = (report["machine"]["gpu"] or "cpu").replace(" ", "-").lower()
    suffix = "-" + "-".join(args.only) if args.only else ""
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-{dev}{suffix}.json"
    for name, fn in [s for s in steps if args.only is None or s[0] in args.only]:
        t = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as e:  # report what failed and go on: device time is scarce
            report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            traceback.print_exc()
        print(name, round(time.perf_counter() - t, 1), "s", json.dumps(report[name])[:600], flush=True)
        path.write_text(json.dumps(report, indent=1) + "\n")  # after every step: a cut-off run keeps its steps
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
