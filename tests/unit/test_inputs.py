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


def encoded(img: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def image(w: int, h: int, fmt: str = "PNG") -> bytes:
    return encoded(Image.fromarray(np.zeros((h, w), np.uint8)), fmt)


def png_of(a: np.ndarray, **save) -> bytes:
    return encoded(Image.fromarray(a), **save)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def built_png(w: int, h: int, colour: int, interlace: int, raw: bytes) -> bytes:
    """An 8-bit PNG written by hand: IHDR, one IDAT of `raw` (filtered scanlines) compressed, IEND."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, interlace)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels and holds no image data: what a decompression bomb's header looks like."""
    return built_png(w, h, 0, 0, b"")


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
    if how == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6
        return png_of(a, exif=exif)
    if how == "xmp":
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
        return png_of(a, pnginfo=info)
    return png_of(a)


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


def with_chunk(png: bytes, kind: bytes, data: bytes) -> bytes:
    """`png` with one more chunk right after IHDR (8 bytes of signature, 25 of IHDR)."""
    return png[:33] + png_chunk(kind, data) + png[33:]


def interlaced_png(a: np.ndarray) -> bytes:
    """An Adam7-interlaced 8-bit PNG of `a` (grey (H, W) or RGB (H, W, 3)); PIL only writes progressive ones."""
    h, w = a.shape[:2]
    raw = b""
    for y0, x0, dy, dx in (
        (0, 0, 8, 8),
        (0, 4, 8, 8),
        (4, 0, 8, 4),
        (0, 2, 4, 4),
        (2, 0, 4, 2),
        (0, 1, 2, 2),
        (1, 0, 2, 1),
    ):
        sub = np.ascontiguousarray(a[y0::dy, x0::dx])
        if sub.size:
            raw += b"".join(b"\x00" + row.tobytes() for row in sub)  # filter 0 on every row
    return built_png(w, h, 0 if a.ndim == 2 else 2, 1, raw)


def test_plain_pngs_decode_to_the_same_pixels_through_libspng_as_through_pil(mnist_test):
    """The fast path (libspng) takes only PNGs it decodes exactly as PIL does; everything else goes through PIL.
    Both paths are compared on the files each case makes, and the end-to-end decode on the held-out digits."""
    import platform
    import sys

    import pytest

    from nccr_guard import inputs
    from nccr_guard.inputs import InputError, Limits, decode_image, pil_pixels, plain_png, spng_pixels
    from nccr_guard.manifest import load_manifest
    from tests.conftest import MNIST

    rng = np.random.default_rng(0)
    grey, rgb = rng.integers(0, 256, (23, 37), np.uint8), rng.integers(0, 256, (17, 31, 3), np.uint8)
    if sys.platform == "linux" and platform.machine() == "x86_64":
        assert inputs.pyspng is not None, "pyspng is a dependency on x86-64 Linux (pyproject.toml)"
    elif inputs.pyspng is None:  # no libspng wheel for this platform: every image takes the PIL path
        assert not plain_png(png_of(grey), "L")
        return
    m = load_manifest(MNIST)
    spec_l, spec_rgb = m.input.image, m.input.image.model_copy(update={"mode": "RGB"})
    plain = {
        "grey": (png_of(grey), spec_l),
        "grey, most compression": (png_of(grey, compress_level=9, optimize=True), spec_l),
        "rgb": (png_of(rgb), spec_rgb),
        "grey, interlaced": (interlaced_png(grey), spec_l),
        "rgb, interlaced": (interlaced_png(rgb), spec_rgb),
        "grey with gAMA and pHYs": (
            with_chunk(with_chunk(png_of(grey), b"gAMA", struct.pack(">I", 45455)), b"pHYs", bytes(9)),
            spec_l,
        ),
    }
    for name, (data, spec) in plain.items():
        assert plain_png(data, spec.mode), name
        np.testing.assert_array_equal(spng_pixels(data, Limits()), pil_pixels(data, spec, Limits()), err_msg=name)
    not_plain = {
        "rgb into a grey model": (png_of(rgb), spec_l),
        "grey into an rgb model": (png_of(grey), spec_rgb),
        "text chunk (may hold an orientation)": (with_chunk(png_of(grey), b"tEXt", b"Comment\x00hi"), spec_l),
        "exif orientation": (oriented_png("exif"), spec_l),
        "16-bit": (png_of(grey.astype(np.uint16) * 257), spec_l),
        "palette": (encoded(Image.fromarray(rgb).quantize(8)), spec_l),
        "transparency": (png_of(grey, transparency=0), spec_l),
        "bad CRC": (png_of(grey)[:-5] + b"\x00" + png_of(grey)[-4:], spec_l),
        "JPEG": (image(8, 8, "JPEG"), spec_l),
    }
    for name, (data, spec) in not_plain.items():
        assert not plain_png(data, spec.mode), name
    # A cut zlib stream with its CRC made right again: libspng refuses it, and PIL says why.
    good = png_of(grey)
    start = 8 + 25
    (n,) = struct.unpack(">I", good[start : start + 4])
    idat = good[start + 8 : start + 8 + n]
    cut = good[:start] + png_chunk(b"IDAT", idat[: n // 2]) + png_chunk(b"IEND", b"")
    assert plain_png(cut, "L") and spng_pixels(cut, Limits()) is None
    with pytest.raises(InputError, match="cannot decode image"):
        decode_image(cut, m)
    # The size limit holds on the fast path before libspng allocates anything.
    with pytest.raises(InputError, match="exceeds") as e:
        decode_image(good, m, Limits(max_pixels=100))
    assert e.value.status == 413
    # End to end on the held-out digits: exactly the float32 p / 255 the model was calibrated on.
    for x in mnist_test[0][:16, 0]:
        p = (x * 255).round().astype(np.uint8)
        data = png_of(p)
        assert plain_png(data, "L")
        np.testing.assert_array_equal(decode_image(data, m)[0], p.astype(np.float32) / np.float32(255))
