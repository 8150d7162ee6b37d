"""The speaker model against resemblyzer itself, on real synthesised speech."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from nccr_guard.audio import decode_audio
from nccr_guard.backends.torch_backend import load_module
from nccr_guard.manifest import load_manifest
from nccr_guard.speaker import partial_slices
from nccr_guard.speaker_corpus import SPLITS, UNIQUE_FROM, corpus_plan, sentences, synthesise
from tests.conftest import ROOT

SPEAKER = load_manifest(ROOT / "models" / "speaker")


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """Two real utterances (espeak-ng at 22.05 kHz, festival at 16 kHz) through the upload decoder."""
    folder = tmp_path_factory.mktemp("speech")
    clips = []
    for voice in ("espeak:en-gb+f2", "festival:kal_diphone"):
        out = folder / f"{voice.replace(':', '_')}.wav"
        synthesise(voice, "The quick brown fox jumps over the lazy dog near the river bank.", 0.0, out)
        clips.append(decode_audio(out.read_bytes(), SPEAKER))
    return np.stack(clips)


@pytest.fixture(scope="module")
def net():
    return load_module(SPEAKER)


def test_embeddings_match_resemblyzer(net, speech: np.ndarray) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from resemblyzer import VoiceEncoder

    ref = VoiceEncoder(device="cpu", verbose=False)
    with torch.inference_mode():
        ours = net.embeddings(torch.from_numpy(speech)).numpy()
    for mine, x in zip(ours, speech, strict=True):
        theirs = ref.embed_utterance(x[0])
        assert float(mine @ theirs) / np.linalg.norm(mine) / np.linalg.norm(theirs) >= 0.99


def test_mel_front_end_matches_librosa(net, speech: np.ndarray) -> None:
    import librosa

    wav = speech[0, 0]
    ref = librosa.feature.melspectrogram(y=wav, sr=16000, n_fft=400, hop_length=160, n_mels=40).T
    with torch.inference_mode():
        ours = net.frontend(torch.from_numpy(wav)[None])[0].numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-4 * ref.max())


def test_partial_slices_match_resemblyzer() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from resemblyzer import VoiceEncoder

    for n in (8000, 25600, 48000, 80000, 160000):
        _, mel = VoiceEncoder.compute_partial_slices(n, 1.3, 0.75)
        assert partial_slices(n)[0] == mel


def test_gradients_flow_from_the_waveform(net, speech: np.ndarray) -> None:
    x = torch.from_numpy(speech[:1]).requires_grad_(True)
    net(x)[0, 0].backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_the_held_out_speaker_is_recognised(net, speech: np.ndarray) -> None:
    with torch.inference_mode():
        pred = net(torch.from_numpy(speech)).argmax(1).tolist()
    assert [SPEAKER.labels[i] for i in pred] == ["espeak:en-gb+f2", "festival:kal_diphone"]


def test_corpus_splits_use_different_sentences() -> None:
    texts = {s: {p[2] for p in corpus_plan(SPEAKER.split, s) if p[0] == 0} for s in ("train", "calib", "dev", "test")}
    assert all(len(v) > 1 for v in texts.values())
    names = list(texts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not texts[a] & texts[b], (a, b)
    assert sentences(3, 5) == sentences(3, 5)
    # The stream itself is pinned: every cached clip, calibration and report was made from it.
    assert sentences(7, 2) == [
        "Her cousin watched the garden gate at midnight without saying a word.",
        "The new teacher measured seven yellow apples before the storm and then went home.",
    ]


def test_later_splits_never_repeat_a_sentence_of_their_speaker() -> None:
    """From calib2 on, no speaker reads a sentence twice (the stream repeats one now and then: speaker 6's
    holdout3 would have re-read a calib and a holdout2 sentence), and the splits before keep their clips."""
    later = SPLITS[UNIQUE_FROM:]
    counts = SPEAKER.split["counts"]
    for spk in range(len(SPEAKER.labels)):
        texts = {s: [p[2] for p in corpus_plan(SPEAKER.split, s) if p[0] == spk] for s in SPLITS}
        assert all(len(texts[s]) == counts[s] for s in SPLITS)
        earlier = [t for s in SPLITS[:UNIQUE_FROM] for t in texts[s]]
        fresh = [t for s in later for t in texts[s]]
        assert len(set(fresh)) == len(fresh) and not set(fresh) & set(earlier), spk
        # an earlier split is the plain slice of the stream, as before later splits existed
        offset = sum(counts[s] for s in SPLITS[: SPLITS.index("holdout2")])
        assert texts["holdout2"] == sentences(spk, offset + counts["holdout2"])[offset:]


def test_calibration_splits_come_from_the_manifest() -> None:
    from nccr_guard.datasets import calibration_splits, load_calibration

    assert calibration_splits(SPEAKER) == ["calib", "calib2"]
    mnist = load_manifest(ROOT / "models" / "mnist")
    assert calibration_splits(mnist) == ["calib"]
    x, y = load_calibration(mnist, limit=20)
    assert x.shape == (20, 1, 28, 28) and set(y.tolist()) == set(range(10))  # spread over the class-ordered split
    assert len(load_calibration(mnist)[0]) == 750
