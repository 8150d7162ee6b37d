"""Memory of the one-graph verdict on ONNX: resident memory of a process holding a ResNet-50-shaped detector
(random weights, 224 px, nccr-v3 calibrated on 40 smooth random images), after loading, after its warm-up
verdict (which builds the verdict graph) and four more, and its peak (VmHWM), with the one-graph verdict (default)
and with `--no-fuse`; each in a fresh process, `--rounds` times, alternated.

    python -m bench.fused_memory [--rounds 2] [--compare CHECKOUT]  ->  reports/bench/fused-memory.json

Why: the verdict graph is a second ONNX Runtime session holding the weights again; the
detector drops the watched-layer session before it builds the graph's (OnnxBackend.release). `--compare` runs the
default configuration of another checkout's code too (its `service/` first on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.common import ROOT, checkout_env, resnet_folder, rss_mb, write_report


def child(folder: Path, fuse: bool) -> None:
    """One process: load, warm up, verdicts; RSS at each step as one JSON line."""
    from nccr_guard.detector import Detector

    det = Detector.load(folder, backend="onnx", device="cpu", threads=1, fuse=fuse)
    pid = os.getpid()
    loaded = rss_mb(pid)
    x = np.random.default_rng(1).random((3, 224, 224)).astype(np.float32)
    det.detect([x])
    warm = rss_mb(pid)
    for _ in range(3):
        det.detect([x])
    after = rss_mb(pid)
    print(
        json.dumps(
            {
                "fused": det.fused,
                "loaded_mb": loaded,
                "warm_mb": warm,
                "after_4_verdicts_mb": after,
                "peak_mb": rss_mb(pid, "VmHWM"),
            }
        )
    )


def model(tmp: Path) -> Path:
    """The ResNet-50 folder with ONNX weights and an nccr-v3 calibration (accuracy irrelevant: memory only)."""
    from PIL import Image

    from nccr_guard.calibrate import calibrate
    from nccr_guard.detector import Detector
    from nccr_guard.export import export_onnx

    folder = resnet_folder(tmp)
    det = Detector.load(folder, backend="torch", device="cpu", calibrated=False)
    export_onnx(det.backend.module, folder / "model.onnx", (3, 224, 224), list(det.manifest.watch))
    toml = (folder / "model.toml").read_text()
    (folder / "model.toml").write_text(toml.replace("[weights]\n", '[weights]\nonnx = "model.onnx"\n', 1))
    data = tmp / "clean"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((224, 224), Image.BILINEAR).save(data / f"{i}.png")
    calibrate(folder, data=data, variant="nccr-v3", backend="onnx")
    return folder


def run(folder: Path, fuse: bool, service_dir: Path | None = None) -> dict:
    flag = "--fuse" if fuse else "--no-fuse"
    out = subprocess.run(
        [sys.executable, "-m", "bench.fused_memory", "--child", str(folder), flag],
        env=checkout_env(service_dir),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compare", type=Path, default=None, help="another checkout: its default configuration too")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.fuse)
        return
    configs = [("this, default", True, None), ("this, --no-fuse", False, None)]
    if args.compare:
        configs.append((f"{args.compare.name}, default", True, args.compare / "service"))
    results: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    with tempfile.TemporaryDirectory() as tmp:
        folder = model(Path(tmp))
        for _ in range(args.rounds):
            for name, fuse, service in configs:
                results[name].append(run(folder, fuse, service))
                print(name, results[name][-1], flush=True)
    cmd = "python -m bench.fused_memory " + " ".join(sys.argv[1:])
    suffix = f"-compare-{args.compare.name}" if args.compare else ""
    write_report(f"fused-memory{suffix}", {"model": "resnet50 224x224, nccr-v3, ONNX", "results": results}, cmd)

    def med(rows: list[dict], key: str) -> float:
        return float(np.median([r[key] for r in rows]))

    print(
        "fused memory, median MB (RSS after warm-up + 4 verdicts / peak): "
        + ", ".join(f"{k} {med(v, 'after_4_verdicts_mb'):.0f} / {med(v, 'peak_mb'):.0f}" for k, v in results.items())
    )


if __name__ == "__main__":
    main()
