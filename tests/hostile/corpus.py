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


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], bytes]
    content_type: str
    expected: int
    multipart: bool = True


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
        w.writeframes(b"\0\0" * 1600)
    return buf.getvalue()


PNG = lambda: _img("L", (28, 28), "PNG")  # noqa: E731

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
    Case("audio (WAV) sent as image", wav_bytes, "image/png", 415),
    Case("image sent with an audio content type", PNG, "audio/wav", 200),
    Case("raw text body", lambda: b"hello", "text/plain", 415, multipart=False),
    Case("raw JSON body", lambda: b'{"image": [1, 2, 3]}', "application/json", 415, multipart=False),
    Case("raw empty body", lambda: b"", "image/png", 400, multipart=False),
    Case("raw 11 MB body", lambda: b"\x89PNG\r\n\x1a\n" + b"\0" * (11 << 20), "image/png", 413, multipart=False),
]


if __name__ == "__main__":
    for c in CASES:
        print(f"| {c.name} | {'multipart' if c.multipart else 'raw'} | {c.content_type} | {c.expected} |")
