"""Hostile and odd uploads, generated in memory (nothing large is committed), each with its expected status.

The table is the contract: a legitimate image in an odd format gets 200, anything else a 4xx with a clear
message, never a 5xx. `python -m tests.hostile.corpus` prints it.
"""

from __future__ import annotations

import io
import struct
import wave
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bench.common import rss_mb
from nccr_guard.audio import encode_wav


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], bytes]
    content_type: str
    expected: int
    multipart: bool = True
    path: str = "/v1/detect"


def _img(mode: str, size: tuple[int, int], fmt: str, **save) -> bytes:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (size[1], size[0]), np.uint8)
    if mode == "I;16":
        img = Image.fromarray(gray.astype(np.uint16) * 257)
    else:
        img = Image.fromarray(np.stack([gray] * 3, -1)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A syntactically valid PNG header that claims a huge canvas (a decompression bomb's calling card)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF0) claims `width` x `height`."""
    jpg = bytearray(_img("L", (8, 8), "JPEG"))
    i = jpg.find(b"\xff\xc0")
    jpg[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(jpg)


def gif_animated() -> bytes:
    frames = [Image.fromarray(np.full((28, 28), v, np.uint8)) for v in (0, 128, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def jpeg_exif_rotated() -> bytes:
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 28), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def wav_bytes() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 40000)  # 2.5 s, over the speaker model's minimum
    return buf.getvalue()


PNG = lambda: _img("L", (28, 28), "PNG")  # noqa: E731


def _tone(rate: int = 16000, seconds: float = 2.5, poison: float | None = None) -> np.ndarray:
    wav = (0.3 * np.sin(2 * np.pi * 300 * np.arange(int(rate * seconds)) / rate)).astype(np.float32)
    if poison is not None:
        wav[len(wav) // 2] = poison
    return wav


def wav_header(rate: int, channels: int, data_bytes: int, bits: int = 16) -> bytes:
    """A PCM WAV header with whatever it is told to claim."""
    block = channels * bits // 8
    fmt = struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, bits)
    return b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt " + fmt + b"data" + struct.pack("<I", data_bytes)


def flac_truncated() -> bytes:
    flac = encode_wav(_tone(), fmt="FLAC")
    return flac[: len(flac) // 3]


def kserve(tensor: dict | str, raw: bool = False) -> Callable[[], bytes]:
    import json

    return lambda: tensor.encode() if raw else json.dumps({"inputs": [tensor]}).encode()


def _t(shape: list[int], datatype: str = "FP32", data: list | None = None) -> dict:
    return {"name": "input", "shape": shape, "datatype": datatype, "data": data if data is not None else [0.0] * 784}


V2 = "/v2/models/mnist/infer"
AUDIO_CASES = [
    Case("WAV, 16 kHz mono", lambda: encode_wav(_tone()), "audio/wav", 200),
    Case("WAV, 44.1 kHz stereo", lambda: encode_wav(np.stack([_tone(44100)] * 2, 1), 44100), "audio/wav", 200),
    Case("WAV, 8 channels (mixed down)", lambda: encode_wav(np.stack([_tone()] * 8, 1)), "audio/wav", 200),
    Case("FLAC, 48 kHz", lambda: encode_wav(_tone(48000), 48000, fmt="FLAC"), "audio/flac", 200),
    Case("OGG Vorbis, 22.05 kHz", lambda: encode_wav(_tone(22050), 22050, "VORBIS", "OGG"), "audio/ogg", 200),
    Case("MP3, 16 kHz", lambda: encode_wav(_tone(), 16000, "MPEG_LAYER_III", "MP3"), "audio/mpeg", 200),
    Case("ID3 tag, then garbage", lambda: b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(300), "audio/mpeg", 400),
    Case("WAV with zero samples", lambda: encode_wav(np.zeros(0, np.float32)), "audio/wav", 400),
    Case("WAV of 1 s (the speaker model's minimum is 2 s)", lambda: encode_wav(_tone(seconds=1.0)), "audio/wav", 422),
    Case("float WAV with a NaN sample", lambda: encode_wav(_tone(poison=np.nan), subtype="FLOAT"), "audio/wav", 400),
    Case("float WAV with an Inf sample", lambda: encode_wav(_tone(poison=np.inf), subtype="FLOAT"), "audio/wav", 400),
    Case("WAV at 1 Hz", lambda: wav_header(1, 1, 2000) + bytes(2000), "audio/wav", 400),
    Case("WAV at 1 MHz", lambda: wav_header(1_000_000, 1, 2000) + bytes(2000), "audio/wav", 400),
    Case("WAV with 1000 channels", lambda: wav_header(16000, 1000, 4000) + bytes(4000), "audio/wav", 400),
    Case("WAV header claiming 5 hours", lambda: wav_header(16000, 1, 576_000_000) + bytes(4000), "audio/wav", 413),
    Case("WAV of 60 s (cap 30 s)", lambda: encode_wav(np.zeros(16000 * 60, np.float32)), "audio/wav", 413),
    Case("truncated FLAC", flac_truncated, "audio/flac", 400),
    Case("FLAC magic, then garbage", lambda: b"fLaC" + bytes(range(256)) * 4, "audio/flac", 400),
    Case("OGG magic, then garbage", lambda: b"OggS" + bytes(200), "audio/ogg", 400),
    Case("image sent to the audio model", PNG, "audio/wav", 415, path="/v1/detect?model=speaker"),
    Case("audio sent to the image model", lambda: encode_wav(_tone()), "image/png", 415, path="/v1/detect?model=mnist"),
]
KSERVE_CASES = [
    Case("KServe v2: valid 1x28x28 tensor", kserve(_t([1, 1, 28, 28])), "application/json", 200, False, V2),
    Case("KServe v2: wrong shape", kserve(_t([1, 27, 28], data=[0.0] * 756)), "application/json", 400, False, V2),
    Case("KServe v2: INT8 datatype", kserve(_t([1, 28, 28], "INT8", [0] * 784)), "application/json", 400, False, V2),
    Case("KServe v2: too few values", kserve(_t([1, 28, 28], data=[0.0] * 10)), "application/json", 400, False, V2),
    Case(
        "KServe v2: NaN value", kserve(_t([1, 28, 28], data=["NaN"] + [0.0] * 783)), "application/json", 400, False, V2
    ),
    Case(
        "KServe v2: bare NaN literal",
        kserve('{"inputs": [{"name": "input", "shape": [1, 1], "datatype": "FP32", "data": [NaN]}]}', raw=True),
        "application/json",
        400,
        False,
        V2,
    ),
    Case("KServe v2: negative dimension", kserve(_t([-1, 28, 28])), "application/json", 400, False, V2),
    Case(
        "KServe v2: 0-255 pixels to a 0-1 model",
        kserve(_t([1, 28, 28], data=[255.0] * 784)),
        "application/json",
        400,
        False,
        V2,
    ),
    Case(
        "KServe v2: 0.5 % over the range (clipped)",
        kserve(_t([1, 28, 28], data=[1.005] * 392 + [-0.005] * 392)),
        "application/json",
        200,
        False,
        V2,
    ),
    Case("KServe v2: inputs not a list", kserve('{"inputs": 3}', raw=True), "application/json", 422, False, V2),
    Case("KServe v2: not JSON", lambda: b"\x89PNG", "application/json", 400, False, V2),
    Case("KServe v2: unknown model", kserve(_t([1, 28, 28])), "application/json", 404, False, "/v2/models/nope/infer"),
    Case("KServe v2: JSON declared octet-stream", kserve(_t([1, 28, 28])), "application/octet-stream", 200, False, V2),
    Case("KServe v2: JSON declared text/plain", kserve(_t([1, 28, 28])), "text/plain", 200, False, V2),
    Case(
        "KServe v2: version 1",
        kserve(_t([1, 28, 28])),
        "application/json",
        200,
        False,
        "/v2/models/mnist/versions/1/infer",
    ),
    Case(
        "KServe v2: unknown version",
        kserve(_t([1, 28, 28])),
        "application/json",
        404,
        False,
        "/v2/models/mnist/versions/2/infer",
    ),
    Case("KServe v2: PNG declared octet-stream", PNG, "application/octet-stream", 400, False, V2),
]

CASES = [
    Case("plain 28x28 PNG", PNG, "image/png", 200),
    Case("truncated PNG", lambda: PNG()[:60], "image/png", 400),
    Case("truncated JPEG", lambda: _img("L", (28, 28), "JPEG")[:100], "image/jpeg", 400),
    Case("PNG with wrong magic bytes", lambda: b"\x89PNX" + PNG()[4:], "image/png", 415),
    Case("PNG header claiming 100000x100000", lambda: png_claiming(100_000, 100_000), "image/png", 413),
    Case("JPEG header claiming 65000x65000", lambda: jpeg_claiming(65_000, 65_000), "image/jpeg", 413),
    Case("animated GIF (first frame used)", gif_animated, "image/gif", 200),
    Case("TIFF", lambda: _img("L", (28, 28), "TIFF"), "image/tiff", 200),
    Case("BMP", lambda: _img("RGB", (28, 28), "BMP"), "image/bmp", 200),
    Case("WebP", lambda: _img("RGB", (28, 28), "WEBP"), "image/webp", 200),
    Case("16-bit grayscale PNG", lambda: _img("I;16", (28, 28), "PNG"), "image/png", 200),
    Case("palette PNG", lambda: _img("P", (28, 28), "PNG"), "image/png", 200),
    Case("CMYK JPEG", lambda: _img("CMYK", (28, 28), "JPEG"), "image/jpeg", 200),
    Case("RGBA PNG", lambda: _img("RGBA", (28, 28), "PNG"), "image/png", 200),
    Case("1x1 PNG", lambda: _img("L", (1, 1), "PNG"), "image/png", 200),
    Case("10000x10 PNG", lambda: _img("L", (10_000, 10), "PNG"), "image/png", 200),
    Case("EXIF-rotated JPEG", jpeg_exif_rotated, "image/jpeg", 200),
    Case("empty file", lambda: b"", "image/png", 400),
    Case("plain text", lambda: b"just some words\n" * 20, "text/plain", 415),
    Case("silent WAV sent with an image content type", wav_bytes, "image/png", 200),
    Case("image sent with an audio content type", PNG, "audio/wav", 200),
    Case("raw text body", lambda: b"hello", "text/plain", 415, multipart=False),
    Case("raw JSON body", lambda: b'{"image": [1, 2, 3]}', "application/json", 415, multipart=False),
    Case("raw empty body", lambda: b"", "image/png", 400, multipart=False),
    Case("raw 11 MB body", lambda: b"\x89PNG\r\n\x1a\n" + b"\0" * (11 << 20), "image/png", 413, multipart=False),
    *AUDIO_CASES,
    *KSERVE_CASES,
]


def send(client, case: Case):
    data = case.make()
    if case.multipart:
        return client.post(case.path, files={"file": ("upload", data, case.content_type)})
    return client.post(case.path, content=data, headers={"content-type": case.content_type})


def observe() -> None:
    """Start a real server with both default models, send every case, print the table with observed answers."""
    import tempfile
    from pathlib import Path

    from tests.conftest import start_server

    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp))
        try:
            with server.client() as c:
                rows, fivexx = [], 0
                for case in CASES:
                    r = send(c, case)
                    fivexx += r.status_code >= 500
                    ready = c.get("/v2/health/ready").status_code == 200
                    note = "" if ready else " (not ready after!)"
                    rows.append(
                        f"| {case.name} | {case.path} | {'multipart' if case.multipart else 'raw'} | "
                        f"{case.content_type} | {case.expected} | {r.status_code}{note} |"
                    )
                before = rss_mb(server.proc.pid)
                for _ in range(3):  # memory back to baseline: the whole corpus three times more
                    for case in CASES:
                        send(c, case)
                after = rss_mb(server.proc.pid)
        finally:
            server.stop()
    print("| case | path | body | declared type | expected | observed |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(
        f"\n{len(CASES)} cases, {fivexx} 5xx; server RSS {before:.0f} MB after one pass of the corpus, "
        f"{after:.0f} MB after three more"
    )


if __name__ == "__main__":
    import sys

    if "--observe" in sys.argv:
        observe()
    else:
        for c in CASES:
            print(
                f"| {c.name} | {c.path} | {'multipart' if c.multipart else 'raw'} | {c.content_type} | {c.expected} |"
            )
