"""Train the photo model (a ResNet-14 on 32x32 crops of real photographs) and export it.

Reproduce everything in this folder (weights, ONNX export, calibration):
    python models/photo/train.py && nccr-guard calibrate --model models/photo
Seeded; one CPU thread (bit-for-bit the same weights on the same machine), about 7 minutes. The split (disjoint
blocks of each photo) is in model.toml, its construction in nccr_guard/photo_crops.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from nccr_guard.datasets import load_split
from nccr_guard.export import export_onnx
from nccr_guard.manifest import load_manifest
from nccr_guard.nets import PhotoResNet
from nccr_guard.training import accuracy, colour_augment, train

HERE = Path(__file__).resolve().parent


def onnx_gap(path: Path, model: torch.nn.Module, x: np.ndarray) -> float:
    """Largest absolute logit difference between the ONNX export and the torch model on `x`."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"input": x})
    with torch.inference_mode():
        return float(np.abs(logits - model(torch.from_numpy(x)).numpy()).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE, help="model folder to write (default: this one)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    manifest = load_manifest(HERE)
    x, y = load_split(manifest, "train")
    xd, yd = load_split(manifest, "dev")
    xt, yt = load_split(manifest, "test")
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    net = PhotoResNet(len(manifest.labels))
    model = train(net, x, y, args.epochs, args.seed, augment=colour_augment, weight_decay=args.weight_decay)
    seconds = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "weights.pt")
    export_onnx(model, args.out / "model.onnx", tuple(manifest.input.shape), manifest.watch)
    report = {
        "seed": args.seed,
        "epochs": args.epochs,
        "weight_decay": args.weight_decay,
        "params": sum(p.numel() for p in model.parameters()),
        "train_n": len(x),
        "dev_n": len(xd),
        "test_n": len(xt),
        "train_accuracy": accuracy(model, x, y),
        "dev_accuracy": accuracy(model, xd, yd),
        "test_accuracy": accuracy(model, xt, yt),
        "onnx_max_logit_gap": onnx_gap(args.out / "model.onnx", model, xt),
        "train_seconds": round(seconds, 1),
    }
    (args.out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
