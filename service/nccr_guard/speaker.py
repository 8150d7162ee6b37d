"""The default audio model: speaker identification on resemblyzer's pretrained GE2E encoder.

The encoder weights (Apache-2.0, Resemble AI) are read from the installed `resemblyzer` package, never copied;
the package is located without importing it (its `webrtcvad` import drags in `pkg_resources`). Everything
between the waveform and the logits is torch, so gradients flow from the samples (ART attacks need them):

    waveform (B, 1, N) -> STFT as a strided conv -> power -> 40 mel bands (resemblyzer's librosa settings)
    -> fixed 1.6 s partials (resemblyzer's `compute_partial_slices` for N samples) -> 3-layer LSTM -> linear
    -> ReLU -> L2 norm -> mean over partials -> L2 norm (`embed`) -> GE2E similarity to each enrolled
    speaker's centroid, scaled by the encoder's trained similarity weight and bias -> logits.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

RATE = 16_000
N_FFT, HOP, N_MELS = 400, 160, 40  # 25 ms window, 10 ms step (resemblyzer hparams)
PARTIAL_FRAMES = 160  # 1.6 s
ENCODER_SHA256 = "39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e"  # resemblyzer 0.1.4


def encoder_weights_path() -> Path:
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the speaker model needs the `resemblyzer` package for its encoder weights")
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return path


def partial_slices(n_samples: int, rate: float = 1.3, min_coverage: float = 0.75) -> tuple[list[slice], int]:
    """Mel-frame slices of the partial utterances and the padded sample count: resemblyzer's
    `VoiceEncoder.compute_partial_slices` (embed_utterance defaults), so embeddings match it."""
    n_frames = math.ceil((n_samples + 1) / HOP)
    frame_step = round((RATE / rate) / HOP)
    steps = max(1, n_frames - PARTIAL_FRAMES + frame_step + 1)
    mel = [slice(i, i + PARTIAL_FRAMES) for i in range(0, steps, frame_step)]
    last_start = mel[-1].start * HOP
    coverage = (n_samples - last_start) / (PARTIAL_FRAMES * HOP)
    if coverage < min_coverage and len(mel) > 1:
        mel = mel[:-1]
    return mel, max(n_samples, mel[-1].stop * HOP)


class MelFrontEnd(nn.Module):
    """librosa.feature.melspectrogram(sr=16000, n_fft=400, hop_length=160, n_mels=40), centred with zero padding,
    power 2, Slaney mel filters: the DFT is a conv1d with a periodic-Hann-windowed cos/sin basis."""

    def __init__(self) -> None:
        super().__init__()
        n = torch.arange(N_FFT, dtype=torch.float64)
        k = torch.arange(N_FFT // 2 + 1, dtype=torch.float64)[:, None]
        window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / N_FFT)
        angle = 2 * math.pi * k * n / N_FFT
        basis = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window])[:, None, :]
        self.register_buffer("basis", basis.float(), persistent=False)
        self.register_buffer("mel_fb", torch.zeros(N_MELS, N_FFT // 2 + 1))  # filled from head.pt (librosa's)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, frames, 40) mel power spectrogram."""
        x = nn.functional.pad(wav[:, None, :], (N_FFT // 2, N_FFT // 2))
        spec = nn.functional.conv1d(x, self.basis, stride=HOP)  # (B, 2 * 201, frames)
        re, im = spec.chunk(2, dim=1)
        return torch.matmul(self.mel_fb, re * re + im * im).transpose(1, 2)


class GE2EEncoder(nn.Module):
    """resemblyzer's VoiceEncoder network: (P, 160, 40) mel partials -> (P, 256) L2-normed embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)
        self.relu = nn.ReLU()

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        raw = self.relu(self.linear(hidden[-1]))
        return raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def load_pretrained(self, path: Path | None = None, check_hash: bool = True) -> dict:
        """Load the package's weights; returns the GE2E similarity weight and bias stored beside them."""
        path = path or encoder_weights_path()
        raw = path.read_bytes()  # read once: hashed, then loaded from memory
        if check_hash:
            digest = hashlib.sha256(raw).hexdigest()
            if digest != ENCODER_SHA256:
                raise ValueError(f"{path}: sha256 {digest[:12]}… is not the encoder this model was enrolled with")
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)["model_state"]
        self.load_state_dict({k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))})
        return {k: state[k] for k in ("similarity_weight", "similarity_bias")}


class Identity(nn.Identity):
    """A named point in the graph for the backends' hooks (the watched layers)."""


class SpeakerNet(nn.Module):
    """Waveform (B, 1, N) in [-1, 1] at 16 kHz -> logits over the enrolled speakers.

    Watched layers: `partials` (B, P, 256), the per-partial embeddings, and `embed` (B, 256), the utterance
    embedding. The head (mel filters, centroids, similarity scale) is the model folder's `head.pt`; the encoder
    comes from the resemblyzer package at construction."""

    def __init__(self, n_speakers: int = 10, n_samples: int = 48_000, pretrained: bool = True) -> None:
        super().__init__()
        self.frontend = MelFrontEnd()
        self.encoder = GE2EEncoder()
        self.partials = Identity()
        self.embed = Identity()
        self.mel_slices, self.padded = partial_slices(n_samples)
        self.register_buffer("centroids", torch.zeros(n_speakers, 256))
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("bias", torch.zeros(1))
        if pretrained:
            sim = self.encoder.load_pretrained()
            self.scale.copy_(sim["similarity_weight"])
            self.bias.copy_(sim["similarity_bias"])

    def head_state(self) -> dict[str, torch.Tensor]:
        """What the model folder stores: everything but the package's encoder weights."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):  # noqa: ANN001
        """Accept a head-only state (`head.pt`): the encoder is already loaded from the package."""
        missing = set(self.state_dict()) - set(state)
        if strict and any(not k.startswith("encoder.") for k in missing):
            raise RuntimeError(f"head state is missing {sorted(k for k in missing if not k.startswith('encoder.'))}")
        return super().load_state_dict({**self.state_dict(), **state}, strict=strict, assign=assign)

    def embeddings(self, x: torch.Tensor) -> torch.Tensor:
        wav = x.reshape(x.shape[0], -1)
        wav = nn.functional.pad(wav, (0, self.padded - wav.shape[1]))
        mel = self.frontend(wav)
        parts = torch.stack([mel[:, s] for s in self.mel_slices], dim=1)  # (B, P, 160, 40)
        b, p = parts.shape[:2]
        part_emb = self.partials(self.encoder(parts.reshape(b * p, PARTIAL_FRAMES, N_MELS)).reshape(b, p, -1))
        raw = part_emb.mean(dim=1)
        return self.embed(raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings(x)
        cents = self.centroids / self.centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return self.scale * emb @ cents.T + self.bias


def librosa_mel_filters() -> np.ndarray:
    """The mel filter bank resemblyzer's preprocessing uses (build time only: librosa is not a runtime need)."""
    import librosa

    return librosa.filters.mel(sr=RATE, n_fft=N_FFT, n_mels=N_MELS).astype(np.float32)
