"""Where and how an upload is decoded: header-declared pixel counts, the event-loop decoding budget, PNG
orientation and pixel scaling."""

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


def oriented_png(how: str) -> bytes:
    """A 4x2 PNG whose top-left pixel is white, with an orientation 6 (turn 90° clockwise) stored `how`."""
    a = np.zeros((2, 4), np.uint8)
    a[0, 0] = 255
    buf = io.BytesIO()
    img = Image.fromarray(a)
    if how == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(buf, format="PNG", exif=exif)
    elif how == "xmp":
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
        img.save(buf, format="PNG", pnginfo=info)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def manifest_with(tmp_path, shape: tuple[int, int, int], value_range: tuple[float, float], invert: bool):
    from nccr_guard.manifest import load_manifest
    from tests.conftest import MNIST

    toml = (MNIST / "model.toml").read_text()
    c, h, w = shape
    toml = toml.replace("shape = [1, 28, 28]", f"shape = [{c}, {h}, {w}]")
    toml = toml.replace("range = [0.0, 1.0]", f"range = [{value_range[0]}, {value_range[1]}]")
    toml = toml.replace("invert = false", f"invert = {str(invert).lower()}")
    (tmp_path / "model.toml").write_text(toml)
    return load_manifest(tmp_path)


def test_png_orientation_from_exif_or_xmp_is_applied_and_plain_pngs_skip_the_exif_walk(tmp_path):
    from nccr_guard.inputs import decode_image, may_be_oriented

    m = manifest_with(tmp_path, (1, 4, 2), (0.0, 1.0), False)  # 2 wide, 4 high: the turned image
    for how in ("exif", "xmp"):
        img = Image.open(io.BytesIO(oriented_png(how)))
        img.load()
        assert may_be_oriented(img), how
        x = decode_image(oriented_png(how), m)
        assert x.shape == (1, 4, 2) and x[0, 0, 1] == 1.0 and x.sum() == 1.0, how  # top-left went top-right
    plain = Image.open(io.BytesIO(oriented_png("none")))
    plain.load()
    assert not may_be_oriented(plain)
    assert may_be_oriented(Image.open(io.BytesIO(image(3, 3, "JPEG"))))  # other formats: always walked


def test_pixel_scaling_matches_the_manifest_range_and_inversion(tmp_path):
    from nccr_guard.inputs import decode_image

    a = np.arange(0, 256, 16, dtype=np.uint8).reshape(4, 4)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    cases = ((0.0, 1.0, False), (0.0, 1.0, True), (-1.0, 1.0, True), (0.0, 255.0, False), (-0.5, 2.0, True))
    for lo, hi, invert in cases:
        m = manifest_with(tmp_path, (1, 4, 4), (lo, hi), invert)
        p = a / 255.0
        want = lo + (hi - lo) * ((1 - p) if invert else p)
        got = decode_image(buf.getvalue(), m)
        assert got.dtype == np.float32 and got.shape == (1, 4, 4)
        np.testing.assert_allclose(got[0], want, rtol=1e-6, atol=1e-6)
        if (lo, hi) == (0.0, 1.0):  # the default range: exactly the float32 p / 255 the model was calibrated on
            f = a.astype(np.float32) / np.float32(255)
            np.testing.assert_array_equal(got[0], np.float32(1) - f if invert else f)
