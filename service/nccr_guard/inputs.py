"""Decode untrusted uploads into model-input arrays. Every failure is an InputError with a clear message and
an HTTP status, never a crash: size and pixel limits are checked before the full decode."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np

from nccr_guard.manifest import Manifest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMAGE_MAGIC = (PNG_MAGIC, b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")
AUDIO_MAGIC = (b"RIFF", b"fLaC", b"OggS")


class InputError(ValueError):
    def __init__(self, message: str, status: int = 400, reason: str = "bad_input") -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_audio_s: float = 30.0


DEFAULT_LIMITS = Limits()


def sniff_modality(data: bytes, content_type: str | None = None) -> str:
    """'image' or 'audio' from magic bytes (trusted over the declared content type)."""
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "image"
    if data.startswith(AUDIO_MAGIC) or is_mp3(data):
        return "audio"
    if data.startswith(IMAGE_MAGIC):
        return "image"
    if not data:
        raise InputError("empty upload")
    ct = (content_type or "").split(";")[0].strip()
    raise InputError(
        f"unsupported file type (content type {ct or 'unknown'}; expected an image: PNG, JPEG, GIF, BMP, WebP, "
        "TIFF, or audio: WAV, FLAC, OGG, MP3)",
        415,
        "bad_input",
    )


def is_mp3(data: bytes) -> bool:
    """An ID3v2 tag, or an MPEG audio frame header: 11 sync bits and a layer (the two bits after the version;
    00 is reserved, which also leaves out AAC's ADTS frames). A JPEG's FF D8 has no sync there."""
    if data.startswith(b"ID3"):
        return True
    return len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0 and (data[1] >> 1) & 3 != 0


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR, its first chunk, at a fixed place; None for anything else."""
    if data.startswith(PNG_MAGIC) and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    return None


def check_pixels(w: int, h: int, limits: Limits) -> None:
    if w * h > limits.max_pixels:
        raise InputError(f"image of {w}x{h} pixels exceeds the {limits.max_pixels}-pixel limit", 413, "too_large")


def declared_pixels(data: bytes) -> int | None:
    """The pixel count an image upload's header declares, or None for audio and anything unreadable. Lets the
    caller decide where to decode before paying for it. A PNG's size is at a fixed place (its first chunk is
    IHDR: width, height); other formats ask PIL, which reads only the header (~20 µs, as much again as the
    PNG decode it would precede). The decode checks the limits itself: a wrong header here only moves it."""
    if size := png_size(data):
        return size[0] * size[1]
    from PIL import Image

    try:
        if sniff_modality(data) != "image":
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
    except Exception:  # any failure means "unknown": the real decode reports it properly
        return None
    return w * h


# Where Pillow finds an EXIF orientation in a PNG (Image.getexif): an eXIf chunk, ImageMagick's text chunk, XMP.
PNG_ORIENTATION_KEYS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def may_be_oriented(img) -> bool:
    """False when a loaded PNG has none of the chunks Pillow reads an orientation from: exif_transpose would
    find nothing, after 18 µs of EXIF parsing (a fifth of an MNIST digit's decode). Other formats: True."""
    return img.format != "PNG" or any(k in img.info for k in PNG_ORIENTATION_KEYS)


try:  # libspng: ~5x faster than PIL on a small PNG (docs/performance.md); wheels for x86-64 Linux only
    import pyspng
except ImportError:  # elsewhere every image goes through PIL
    pyspng = None

# Chunks that change nothing PIL's decode gives us (PIL keeps gamma, colour profiles and physical size in
# img.info and applies none of them). Any other chunk (text chunks and eXIf may hold an orientation, tRNS and
# PLTE change colours, APNG's frames) sends the upload through PIL.
PLAIN_PNG_CHUNKS = frozenset((b"IHDR", b"IDAT", b"IEND", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"pHYs", b"sBIT", b"tIME"))
# PNG colour type (8-bit samples) that is already in the model's mode: 0 grey, 2 RGB
PLAIN_PNG_COLOUR = {"L": 0, "RGB": 2}


def plain_png(data: bytes, mode: str) -> bool:
    """True when a PNG decodes to the same pixels through libspng as through PIL and needs no conversion: 8-bit
    samples already in `mode`, only chunks from PLAIN_PNG_CHUNKS, every CRC right (libspng as pyspng sets it up
    ignores CRCs, PIL refuses a bad one). Anything else, malformed files included, takes the PIL path, which
    makes the error messages."""
    if pyspng is None or png_size(data) is None or len(data) < 33:
        return False
    if data[24] != 8 or data[25] != PLAIN_PNG_COLOUR.get(mode):
        return False
    pos, end, view = 8, len(data), memoryview(data)  # a view: no copy of each chunk for its CRC
    while pos + 12 <= end:
        (n,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        if kind not in PLAIN_PNG_CHUNKS or pos + 12 + n > end:
            return False
        (crc,) = struct.unpack_from(">I", data, pos + 8 + n)
        if zlib.crc32(view[pos + 4 : pos + 8 + n]) != crc:
            return False
        if kind == b"IEND":
            return True
        pos += 12 + n
    return False


def pil_pixels(data: bytes, spec, limits: Limits) -> np.ndarray:
    """Any image PIL reads -> uint8 (H, W) or (H, W, 3) in spec.mode, turned upright, alpha over the
    background the model expects."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            check_pixels(w, h, limits)
            if w < 1 or h < 1:
                raise InputError("image has no pixels")
            img.load()
            if may_be_oriented(img):
                ImageOps.exif_transpose(img, in_place=True)  # a copy otherwise, even when nothing turns
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"image too large to decode safely: {e}", 413, "too_large") from None
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
    ) as e:
        raise InputError(f"cannot decode image: {e}") from None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255) if spec.invert else (0, 0, 0, 255))
        img = Image.alpha_composite(bg, img)
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float32)
        img = Image.fromarray(np.clip(arr / (256.0 if arr.max() > 255 else 1.0), 0, 255).astype(np.uint8))
    return np.asarray(img if img.mode == spec.mode else img.convert(spec.mode))


def spng_pixels(data: bytes, limits: Limits) -> np.ndarray | None:
    """A plain PNG's pixels through libspng, or None when libspng refuses it (PIL then says why). The size limit
    is checked from IHDR first: libspng would allocate whatever the header declares."""
    check_pixels(*png_size(data), limits)
    try:
        return pyspng.load(data)
    except RuntimeError:
        return None


def centre_crop(pixels: np.ndarray, aspect: float) -> np.ndarray:
    """The largest centred window of `pixels` (H, W, ...) whose width / height is `aspect` (a view)."""
    ph, pw = pixels.shape[:2]
    ch, cw = (ph, max(1, round(ph * aspect))) if pw / ph > aspect else (max(1, round(pw / aspect)), pw)
    top, left = (ph - ch) // 2, (pw - cw) // 2
    return pixels[top : top + ch, left : left + cw]


def decode_image(data: bytes, manifest: Manifest, limits: Limits = Limits()) -> np.ndarray:
    """Image bytes -> (C, H, W) float32 in the manifest's value range. Plain PNGs in the model's own mode go
    through libspng, everything else through PIL; both give the same pixels (tests/unit/test_inputs.py)."""
    spec = manifest.input.image
    if len(data) > limits.max_bytes:
        raise InputError(f"upload of {len(data)} bytes exceeds {limits.max_bytes}", 413, "too_large")
    pixels = spng_pixels(data, limits) if plain_png(data, spec.mode) else None
    if pixels is None:
        pixels = pil_pixels(data, spec, limits)
    c, h, w = manifest.input.shape
    if pixels.shape[:2] != (h, w):
        from PIL import Image

        if spec.fit == "crop":
            pixels = centre_crop(pixels, w / h)
        img = Image.fromarray(pixels)  # uint8 (H, W) is L, (H, W, 3) RGB
        pixels = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=3.0))
    # value = lo + (hi - lo) * p / 255, or with invert lo + (hi - lo) * (1 - p / 255), in one division and one
    # addition: for the usual range [0, 1] bit for bit p / 255 (or 1 - p / 255), as the calibration data were
    lo, hi = manifest.input.range
    scale, offset = (lo - hi, hi) if spec.invert else (hi - lo, lo)
    arr = np.divide(pixels, np.float32(255.0 / scale), dtype=np.float32)
    arr += np.float32(offset)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def decode(data: bytes, manifest: Manifest, limits: Limits = Limits()) -> np.ndarray:
    """Any supported upload -> model-input array for `manifest`, checking the modality matches."""
    if len(data) > limits.max_bytes:
        raise InputError(f"upload of {len(data)} bytes exceeds {limits.max_bytes}", 413, "too_large")
    kind = sniff_modality(data)
    if kind != manifest.modality:
        raise InputError(f"model {manifest.name} takes {manifest.modality}, got {kind}", 415)
    if kind == "image":
        return decode_image(data, manifest, limits)
    from nccr_guard.audio import decode_audio

    return decode_audio(data, manifest, limits)
