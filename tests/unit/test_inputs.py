"""Where an upload is decoded: header-declared pixel counts and the event-loop decoding budget."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from nccr_guard.audio import encode_wav
from nccr_guard.inputs import declared_pixels
from nccr_guard.server.routers.detect import INLINE_PIXELS, INLINE_UPLOADS, decode_inline
from nccr_guard.server.uploads import Upload


def image(w: int, h: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w), np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels and holds no image data: what a decompression bomb's header looks like."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_declared_pixels_reads_headers_only():
    assert declared_pixels(image(28, 28)) == 784
    assert declared_pixels(image(20, 10, "JPEG")) == 200
    assert declared_pixels(png_header_only(5000, 5000)) == 25_000_000  # declared, never decoded
    # A PNG's size is read from IHDR without PIL, bombs included: only where to decode depends on it, and the
    # decode (in a worker thread, as the size is large) refuses it.
    assert declared_pixels(png_header_only(100_000, 100_000)) == 10**10
    assert declared_pixels(image(30, 20, "GIF")) == 600
    assert declared_pixels(encode_wav(np.zeros(1600, np.float32), 16000)) is None
    assert declared_pixels(b"\x89PNG\r\n\x1a\n") is None
    assert declared_pixels(b"not an image") is None


def test_small_images_decode_inline_and_large_or_audio_do_not():
    digit = Upload(image(28, 28), None, "image/png")
    assert decode_inline([digit]) and decode_inline([digit] * INLINE_UPLOADS)
    assert not decode_inline([digit] * (INLINE_UPLOADS + 1))
    side = int(INLINE_PIXELS**0.5)
    assert decode_inline([Upload(image(side, side), None, None)])
    assert not decode_inline([Upload(image(side + 1, side), None, None)])
    assert not decode_inline([Upload(png_header_only(100_000, 100_000), None, None)])
    assert not decode_inline([digit, Upload(encode_wav(np.zeros(1600, np.float32), 16000), None, None)])
