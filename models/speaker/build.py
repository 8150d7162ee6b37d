"""Build the default speaker model from scratch: synthesise the corpus, enrol the speakers, check the encoder
against resemblyzer, write head.pt and train_report.json. Then `nccr-guard calibrate --model models/speaker`.

    python models/speaker/build.py            # ~2 min on 2 cores, most of it speech synthesis (cached after)

Deterministic: the corpus is seeded (model.toml [split]), enrolment is a mean of embeddings.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nccr_guard.manifest import load_manifest
from nccr_guard.speaker import SpeakerNet, librosa_mel_filters
from nccr_guard.speaker_corpus import load_corpus_split

HERE = Path(__file__).resolve().parent


def embed(net: SpeakerNet, xs: np.ndarray, chunk: int = 50) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([net.embeddings(torch.from_numpy(xs[i : i + chunk])) for i in range(0, len(xs), chunk)])


def resemblyzer_parity(net: SpeakerNet, xs: np.ndarray) -> list[float]:
    """Cosine between our embedding and VoiceEncoder.embed_utterance on the same preprocessed waveform."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # webrtcvad's pkg_resources import
        from resemblyzer import VoiceEncoder

    ref = VoiceEncoder(device="cpu", verbose=False)
    ours = embed(net, xs).numpy()
    theirs = np.stack([ref.embed_utterance(x[0]) for x in xs])
    return [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(ours, theirs, strict=True)]


def main() -> None:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    m = load_manifest(HERE)
    net = SpeakerNet(n_speakers=len(m.labels), n_samples=m.input.shape[-1]).eval()
    net.frontend.mel_fb.copy_(torch.from_numpy(librosa_mel_filters()))
    x_enrol, y_enrol = load_corpus_split(m, "train")
    emb = embed(net, x_enrol)
    cents = torch.stack([emb[torch.from_numpy(y_enrol == i)].mean(0) for i in range(len(m.labels))])
    net.centroids.copy_(cents / cents.norm(dim=1, keepdim=True))
    torch.save(net.head_state(), HERE / "head.pt")

    report: dict = {
        "command": "python models/speaker/build.py",
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "speakers": m.labels,
        "enrolment_clips_per_speaker": m.split["counts"]["train"],
        "accuracy": {},
        "confusion_test": None,
    }
    for split in ("train", "calib", "dev", "test"):
        xs, ys = (x_enrol, y_enrol) if split == "train" else load_corpus_split(m, split)
        with torch.inference_mode():
            pred = torch.cat([net(torch.from_numpy(xs[i : i + 50])) for i in range(0, len(xs), 50)]).argmax(1).numpy()
        report["accuracy"][split] = round(float((pred == ys).mean()), 4)
        if split == "test":
            conf = np.zeros((len(m.labels), len(m.labels)), int)
            np.add.at(conf, (ys, pred), 1)
            report["confusion_test"] = conf.tolist()
            cos = resemblyzer_parity(net, xs[:: len(xs) // 10][:10])
            report["resemblyzer_parity_cosine_min"] = round(min(cos), 6)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (HERE / "train_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("accuracy", "resemblyzer_parity_cosine_min", "seconds")}))
    if report["accuracy"]["test"] < 0.95:
        sys.exit("held-out speaker accuracy below the 0.95 goal")


if __name__ == "__main__":
    main()
