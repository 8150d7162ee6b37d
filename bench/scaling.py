"""How the cost of a verdict grows: against the number of perturbed copies K, and against input size.

    python -m bench.scaling [--reps 5]   ->  reports/bench/scaling.json

Cost = wall time of `Detector.activations` for one input (row building + the forward of every row), which is
all a verdict costs besides scoring (microseconds). One thread, CPU, median of `--reps` calls.
- K: the MNIST CNN under `nccr-v2` (two squeezers + K Gaussian copies: K + 3 rows), K = 1 ... 64, on torch
  (`by_k`) and on ONNX Runtime (`by_k_onnx`, the CPU default backend); `--reps` rounds of every K on both in turn
  (median of 4 calls each), reporting the median over rounds of the time and of the ratio to K=1 within the
  round (one K after another gave K=32 / K=1 8.83 and 4.26 in two runs an hour apart). torch's K=64 is bimodal
  (glibc page faults under its CPU allocator, docs/performance.md); ONNX Runtime keeps its own arena.
- input size, each model's default variant: MNIST 28x28; a ResNet-50-shaped net (random weights) at 224x224;
  the speaker model on 1, 3, 5 and 10 s clips (the encoder runs one 1.6 s LSTM partial per ~0.77 s of audio).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import ROOT, median_ms, resnet_folder, write_report
from nccr_guard.detector import Detector
from nccr_guard.engine import get_variant

MNIST, SPEAKER = ROOT / "models" / "mnist", ROOT / "models" / "speaker"
KS = (1, 2, 4, 8, 16, 32, 64)


def cost_ms(det: Detector, x: np.ndarray, reps: int) -> float:
    return median_ms(lambda: det.activations(x[None]), reps)


def speaker_folder(tmp: Path, seconds: float) -> Path:
    folder = tmp / f"speaker-{seconds:g}s"
    folder.mkdir()
    shutil.copy(SPEAKER / "head.pt", folder / "head.pt")
    toml = (SPEAKER / "model.toml").read_text()
    n = int(16000 * seconds)
    toml = toml.replace("shape = [1, 48000]", f"shape = [1, {n}]").replace("seconds = 3.0", f"seconds = {seconds}")
    (folder / "model.toml").write_text(toml)
    return folder


def load(folder: Path, variant: str | None = None, backend: str = "torch") -> Detector:
    det = Detector.load(folder, backend=backend, device="cpu", threads=1, calibrated=False)
    det.variant = get_variant(variant or det.manifest.variant)
    return det


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    result: dict = {"threads": 1, "reps": args.reps, "by_size": []}

    dets = {"by_k": load(MNIST, "nccr-v2"), "by_k_onnx": load(MNIST, "nccr-v2", "onnx")}
    x = rng.random((1, 28, 28), dtype=np.float32)
    variants = {k: get_variant("nccr-v2").with_k(k) for k in KS}
    rounds: list[dict[tuple[str, int], float]] = []
    for _ in range(args.reps):  # every K in each round: the host's drift hits all of them alike
        times = {}
        for k, v in variants.items():
            for key, det in dets.items():
                det.variant = v
                times[key, k] = cost_ms(det, x, 4)
        rounds.append(times)
    for key in dets:
        result[key] = []
        for k, v in variants.items():
            ms = float(np.median([r[key, k] for r in rounds]))
            vs_k1 = float(np.median([r[key, k] / r[key, 1] for r in rounds]))  # the median of each round's ratio
            result[key].append({"k": k, "rows": v.rows, "ms": round(ms, 3), "vs_k1": round(vs_k1, 2)})

    with tempfile.TemporaryDirectory() as tmp:
        sizes = [("mnist 28x28", MNIST, rng.random((1, 28, 28), dtype=np.float32))]
        sizes.append(("resnet50 224x224", resnet_folder(Path(tmp)), rng.random((3, 224, 224), dtype=np.float32)))
        for s in (1.0, 3.0, 5.0, 10.0):
            wav = (0.03 * rng.standard_normal((1, int(16000 * s)))).astype(np.float32)
            sizes.append((f"speaker {s:g} s", speaker_folder(Path(tmp), s), wav))
        for name, folder, xin in sizes:
            det = load(folder)
            ms = cost_ms(det, xin, args.reps)
            result["by_size"].append(
                {
                    "input": name,
                    "variant": det.variant.name,
                    "rows": det.variant.rows,
                    "values": int(xin.size),
                    "ms": round(ms, 2),
                    "ms_per_row": round(ms / det.variant.rows, 2),
                }
            )
    write_report("scaling", result, f"python -m bench.scaling --reps {args.reps}")
    k = {r["k"]: r for r in result["by_k"]}
    ko = {r["k"]: r for r in result["by_k_onnx"]}
    sz = {r["input"]: r for r in result["by_size"]}
    print(
        f"scaling: MNIST K=64 costs {k[64]['vs_k1']}x K=1 on torch ({k[1]['ms']} -> {k[64]['ms']} ms), "
        f"{ko[64]['vs_k1']}x on ONNX ({ko[1]['ms']} -> {ko[64]['ms']} ms); per verdict (torch) "
        + ", ".join(f"{n} {r['ms']} ms" for n, r in sz.items())
    )


if __name__ == "__main__":
    main()
