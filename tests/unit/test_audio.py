"""The audio input path on real encoded files: resampling, mixdown, level, length, and every malformed case."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from nccr_guard.audio import decode_audio, encode_wav, read_audio
from nccr_guard.inputs import InputError, Limits, decode
from nccr_guard.manifest import load_manifest
from tests.conftest import ROOT
from tests.hostile.corpus import AUDIO_CASES

SPEAKER = load_manifest(ROOT / "models" / "speaker")
MNIST = load_manifest(ROOT / "models" / "mnist")


def tone(rate: int, seconds: float = 2.0, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int = 16000) -> float:
    spec = np.abs(np.fft.rfft(x))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spec.argmax()])


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000, 16000])
def test_resampling_keeps_pitch_and_length(rate: int) -> None:
    x = decode_audio(encode_wav(tone(rate, freq=1000.0), rate), SPEAKER)
    assert x.shape == (1, 48000) and x.dtype == np.float32
    voiced = x[0, : 32000 - 200]  # 2 s of tone, then its first second again to fill 3 s
    assert abs(peak_hz(voiced) - 1000.0) < 2.0
    np.testing.assert_array_equal(x[0, 32000:], x[0, :16000])
    rms_db = 20 * np.log10(np.sqrt(np.mean(x[0, :32000].astype(np.float64) ** 2)))
    assert abs(rms_db + 30.0) < 0.1  # -30 dBFS, set on the clip before it is repeated


def test_resampling_removes_content_above_the_new_nyquist() -> None:
    """A polyphase filter, not sample dropping: an 11 kHz tone at 44.1 kHz must not alias into 0-8 kHz."""
    wav = tone(44100, freq=1000.0, amp=0.3) + tone(44100, freq=11000.0, amp=0.3)
    x = decode_audio(encode_wav(wav, 44100, "FLOAT"), SPEAKER)[0, :30000]
    spec = np.abs(np.fft.rfft(x))
    freqs = np.fft.rfftfreq(len(x), 1 / 16000)
    alias = spec[np.abs(freqs - 5000) < 50].max()  # 16 kHz - 11 kHz
    assert alias < 1e-3 * spec.max()


def test_stereo_is_mixed_down() -> None:
    left, right = tone(16000, freq=500.0), tone(16000, freq=2000.0)
    stereo = decode_audio(encode_wav(np.stack([left, right], 1), 16000, "FLOAT"), SPEAKER)
    mono = decode_audio(encode_wav((left + right) / 2, 16000, "FLOAT"), SPEAKER)
    np.testing.assert_allclose(stereo, mono, atol=1e-6)


@pytest.mark.parametrize(
    "fmt,subtype",
    [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("WAV", "FLOAT"), ("MP3", "MPEG_LAYER_III")],
)
def test_formats(fmt: str, subtype: str) -> None:
    x = decode(encode_wav(tone(22050, freq=700.0), 22050, subtype, fmt), SPEAKER)
    assert x.shape == (1, 48000) and abs(peak_hz(x[0, :30000]) - 700.0) < 3.0


def test_mp3_is_told_by_its_tag_or_frame_header() -> None:
    """An ID3 tag or an MPEG audio frame sync with a layer is audio; a JPEG's FF D8 and AAC's ADTS sync are not.
    A file that only starts like an MP3 is a 400, not a 415."""
    from nccr_guard.inputs import is_mp3, sniff_modality

    mp3 = encode_wav(tone(16000), 16000, "MPEG_LAYER_III", "MP3")
    assert is_mp3(mp3) and sniff_modality(mp3) == "audio"
    assert is_mp3(b"\xff\xfb\x90\x64") and is_mp3(b"ID3\x04\x00")
    assert not is_mp3(b"\xff\xd8\xff\xe0") and not is_mp3(b"\xff\xf1\x50\x80") and not is_mp3(b"\xff")
    with pytest.raises(InputError) as e:
        decode(b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(200), SPEAKER)
    assert e.value.status == 400


def test_clips_under_the_minimum_are_refused_and_short_ones_repeat() -> None:
    """The speaker model refuses clips under its 2 s minimum (too little speech to tell an unstable reading from
    an attack) with a 422 that names the minimum; a 2.5 s clip repeats from its start, with no silent tail."""
    assert SPEAKER.input.audio.min_seconds == 2.0
    with pytest.raises(InputError) as e:
        decode_audio(encode_wav(tone(22050, seconds=1.9), 22050), SPEAKER)
    assert (e.value.status, e.value.reason) == (422, "too_short") and "2 s minimum" in str(e.value)
    wav = tone(16000, seconds=2.5, freq=300.0)
    x = decode_audio(encode_wav(wav, 16000, "FLOAT"), SPEAKER)[0]
    np.testing.assert_array_equal(x[40000:], x[:8000])
    assert np.abs(x[40000:]).max() > 0.01


def test_long_clips_are_cropped() -> None:
    x = decode_audio(encode_wav(tone(16000, seconds=10.0), 16000), SPEAKER)
    assert x.shape == (1, 48000) and np.abs(x[0, -100:]).max() > 0


DECODER_CASES = [c for c in AUDIO_CASES if c.expected != 200 and "model=" not in c.path]


@pytest.mark.parametrize("case", DECODER_CASES, ids=[c.name for c in DECODER_CASES])
def test_hostile_audio_is_a_clear_4xx(case) -> None:
    with pytest.raises(InputError) as e:
        decode(case.make(), SPEAKER, Limits())
    assert e.value.status == case.expected, str(e.value)
    assert str(e.value)


def test_audio_sent_to_the_image_model_is_415() -> None:
    with pytest.raises(InputError) as e:
        decode(encode_wav(tone(16000), 16000), MNIST)
    assert e.value.status == 415 and "takes image" in str(e.value)


def test_eight_channels_are_legitimate() -> None:
    wav = np.repeat(tone(16000)[:, None], 8, axis=1)
    samples, rate = read_audio(encode_wav(wav, 16000))
    assert samples.shape == (32000, 8) and rate == 16000


def test_read_stops_at_the_cap_even_if_the_header_lies_low() -> None:
    """A header that understates its length cannot make the decoder read more than the cap."""
    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000 * 4, np.float32), 16000, format="WAV", subtype="PCM_16")
    samples, _ = read_audio(buf.getvalue(), Limits(max_audio_s=5.0))
    assert len(samples) == 16000 * 4
