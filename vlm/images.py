"""Images in: every image Lucid reads is decoded here, within explicit limits, into 8-bit RGB.

Contract of `load_image`: the result is what an image viewer shows, as a PIL "RGB" image: EXIF
orientation applied, the first frame of an animation, 16-bit samples scaled to 8 bits, transparency
composited on `BACKGROUND` (white), CMYK / YCbCr / LAB / HSV converted. Anything else (an unknown
format, a pixel mode with no defined white level, a corrupt or truncated file, a file over the
`ImageLimits`) raises `ImageError` naming the problem. Limits are checked from the header, before any
pixel data is decoded. `display_copy` gives the bounded-size copy that display work (heatmaps,
overlays) draws on, so its cost does not grow with the original's pixels.
Imports only PIL, numpy and the standard library (no torch): front ends validate images first.
"""

from __future__ import annotations

import functools
import io
import os
import re
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from lucid.errors import ImageError, ImageTooLargeError, LimitsError
from vlm.layout import ImageGeometry

ImageLike = Image.Image | str | os.PathLike | bytes | np.ndarray

# Formats Lucid decodes (JPEG includes MPO, the multi-picture JPEG of phones). Others are refused rather
# than guessed: some Pillow plugins identify almost any bytes (TGA), others run external programs (EPS).
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
DISPLAY_MAX_SIDE = 1024

ENV_MAX_BYTES = "LUCID_MAX_IMAGE_BYTES"
ENV_MAX_PIXELS = "LUCID_MAX_IMAGE_PIXELS"
ENV_MAX_FRAMES = "LUCID_MAX_IMAGE_FRAMES"

# What Pillow's decoders raise on malformed data (besides UnidentifiedImageError, an OSError).
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_I_IS_16_BIT = ("PNG", "PPM")  # formats whose 32-bit "I" mode holds 16-bit samples (0..65535)
_CONVERTIBLE = ("1", "L", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")
_ORIENTATION = {  # EXIF orientation -> the transpose that makes the image upright (as viewers do)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what `load_image` decodes; each is checked before pixel data is decoded.

    Attributes:
        max_bytes: largest image file (or bytes object) accepted.
        max_pixels: largest width x height accepted. Above 2 x `PIL.Image.MAX_IMAGE_PIXELS`
            (179 M) Pillow's own guard refuses too: raise both to go beyond.
        max_frames: most frames an animation or multi-page file may declare (the first is used).

    Defaults are overridden by the environment variables LUCID_MAX_IMAGE_BYTES,
    LUCID_MAX_IMAGE_PIXELS and LUCID_MAX_IMAGE_FRAMES (`ImageLimits.from_env`).
    """

    max_bytes: int = 100 * 2**20
    max_pixels: int = 150_000_000
    max_frames: int = 1000

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LimitsError(f"image limit {name} must be a positive integer, got {value!r}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ImageLimits:
        """The defaults, overridden by LUCID_MAX_IMAGE_BYTES / _PIXELS / _FRAMES where set."""
        env = os.environ if environ is None else environ
        values = {}
        for field, var in (
            ("max_bytes", ENV_MAX_BYTES),
            ("max_pixels", ENV_MAX_PIXELS),
            ("max_frames", ENV_MAX_FRAMES),
        ):
            raw = env.get(var)
            if raw is None or not raw.strip():
                continue
            try:
                values[field] = int(raw.strip())
            except ValueError:
                raise LimitsError(
                    f"{var}={raw!r} is not an integer; set it to a positive integer or unset it"
                ) from None
            if values[field] < 1:
                raise LimitsError(f"{var}={raw!r} must be a positive integer; set it to e.g. {getattr(cls, field)}")
        return cls(**values)


def load_image(image: ImageLike, limits: ImageLimits | None = None) -> Image.Image:
    """Decode `image` into the 8-bit RGB picture a viewer shows (see the module contract).

    Args:
        image: a path, the encoded bytes of a file, a PIL image, or an [H, W], [H, W, 1|3|4] uint8 or
            [H, W] uint16 array. Files and bytes are decoded here (limits, EXIF orientation, first
            frame); a PIL image or an array is taken as already decoded (its pixels as they are).
        limits: decoding bounds; default `ImageLimits.from_env()`.

    Raises:
        ImageError: the image cannot be read, is not a supported format or mode, or exceeds a limit.
        LimitsError: a LUCID_MAX_IMAGE_* environment variable is not a positive integer.
    """
    limits = ImageLimits.from_env() if limits is None else limits
    if isinstance(image, Image.Image):
        _check_pixels(image.size, "the image", limits)
        return to_rgb(image, "the image")
    if isinstance(image, np.ndarray):
        return _from_array(image, limits)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if len(data) > limits.max_bytes:
            raise ImageTooLargeError(_too_many_bytes("the image bytes", len(data), limits))
        return _decode(io.BytesIO(data), "the image bytes", limits)
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"an image is a path, bytes, a PIL image or a numpy array, got {type(image).__name__}")
    path = Path(image)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise ImageError(f"cannot read image file {path}: {_reason(e)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"not an image file: {path} is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"not an image file: {path} is not a regular file (a device, pipe or socket)")
    if st.st_size == 0:
        raise ImageError(f"cannot decode {path} as an image: the file is empty")
    if st.st_size > limits.max_bytes:
        raise ImageTooLargeError(_too_many_bytes(str(path), st.st_size, limits))
    try:
        fh = open(path, "rb")  # noqa: SIM115 (closed below; Image.open reads it lazily)
    except OSError as e:
        raise ImageError(f"cannot read image file {path}: {_reason(e)}") from None
    with fh:
        return _decode(fh, str(path), limits)


def to_rgb(im: Image.Image, name: str = "the image", background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Convert any supported PIL mode to 8-bit "RGB" (the conversion `load_image` applies).

    16-bit samples v (I;16*, and the 16-bit "I" of PNG/PPM files) become round(v * 255 / 65535);
    alpha (RGBA, LA, PA, premultiplied RGBa/La, palette or colour-key transparency) is composited on
    `background`; CMYK / YCbCr / LAB / HSV / 1 / L are converted by Pillow (no ICC colour management:
    samples are taken as sRGB). 32-bit integer ("I", other sources) and float ("F") pixels have no
    defined white level and are refused.

    Raises:
        ImageError: the mode has no defined conversion to RGB.
    """
    mode = im.mode
    if mode in _SIXTEEN_BIT or (mode == "I" and im.format in _I_IS_16_BIT):
        a = np.asarray(im)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise ImageError(f"{name}: {mode} pixels outside 0..65535; save it as an 8- or 16-bit image")
        a8 = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(a8).convert("RGB")
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        raise ImageError(f"{name}: {kind} pixels (mode {mode}) have no defined white level; save it as 8- or 16-bit")
    if "transparency" in im.info and mode in ("L", "P", "RGB"):
        im = im.convert("RGBA")  # palette / colour-key transparency becomes alpha
    elif mode in ("PA", "RGBa"):
        im = im.convert("RGBA")
    elif mode == "La":
        im = im.convert("LA")
    if im.mode in ("RGBA", "LA"):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    if mode == "RGB":
        return im
    if mode in _CONVERTIBLE or mode == "P":
        return im.convert("RGB")
    raise ImageError(f"{name}: unsupported pixel mode {mode!r}; convert it to RGB first")


def zoom_to_cover(crop: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`crop` upscaled with Lanczos by max(W/w, H/h), so it covers `size` (W, H) with its aspect kept (one
    side may exceed it): how CARVE zooms a crop, and the testbed-detail oracle view with it."""
    (W, H), (w, h) = size, crop.size
    s = max(W / w, H / h)
    return crop.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)


def display_copy(image: Image.Image, max_side: int = DISPLAY_MAX_SIDE) -> tuple[Image.Image, float]:
    """A copy of `image` whose longer side is at most `max_side`, for display work (heatmaps, overlays).

    Returns:
        (copy, scale): display (x, y) = original (x, y) * scale. scale == 1.0 and the copy is a
        pixel-identical copy when the image already fits; otherwise scale = max_side / longer side
        (< 1), the longer side is exactly `max_side` and the shorter one round(side * scale), at
        least 1, so along it the map is exact to within half a display pixel (use
        `display_geometry` for the exact per-axis map). Downscaled with Pillow's LANCZOS after a
        box reduction (`reducing_gap=2`), in the image's own mode.
    """
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1:
        raise ValueError(f"max_side must be a positive integer, got {max_side!r}")
    w, h = image.size
    longer = max(w, h)
    if longer <= max_side:
        return image.copy(), 1.0
    scale = max_side / longer
    size = (max_side, max(1, round(h * scale))) if w >= h else (max(1, round(w * scale)), max_side)
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0), scale


def display_geometry(geometry: ImageGeometry, display_size: tuple[int, int]) -> ImageGeometry:
    """`geometry` re-expressed for a display copy of the original image of size `display_size`
    (width, height): the same processed frame, with "original" pixels now display pixels. Exact per
    axis (display x = original x * display_width / original_width)."""
    (w, h), (dw, dh) = geometry.original_size, display_size
    sx, sy = dw / w, dh / h
    return ImageGeometry(
        (dw, dh), geometry.processed_size, (geometry.scale[0] / sx, geometry.scale[1] / sy), geometry.offset
    )


def _decode(fp: BinaryIO, name: str, limits: ImageLimits) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below is the guard; Pillow's warning would only be noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp, formats=_available_formats())
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(_bomb(name, e, limits)) from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot decode {name} as an image: not a {', '.join(FORMATS)} file") from None
    except _DECODE_ERRORS as e:
        raise ImageError(f"cannot decode {name} as an image ({type(e).__name__}: {_reason(e)})") from None
    # no `with im:` (closing would free the pixels we return); the caller owns the file handle
    _check_pixels(im.size, name, limits)
    try:
        frames = int(getattr(im, "n_frames", 1))
    except _DECODE_ERRORS as e:
        raise ImageError(f"cannot decode {name} as an image ({type(e).__name__}: {_reason(e)})") from None
    if frames > limits.max_frames:
        raise ImageError(
            f"{name} has {frames:,} frames, over the limit of {limits.max_frames:,} (raise it with {ENV_MAX_FRAMES})"
        )
    try:
        if frames > 1:
            im.seek(0)  # the first frame is the image
        im.load()
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
        method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
        upright = im.transpose(method) if method is not None else im
        return to_rgb(upright, name)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(_bomb(name, e, limits)) from None
    except _DECODE_ERRORS as e:
        raise ImageError(f"cannot decode {name} as an image ({type(e).__name__}: {_reason(e)})") from None


@functools.cache
def _available_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in FORMATS if f in Image.OPEN)  # a Pillow built without WebP has no "WEBP"


def _from_array(a: np.ndarray, limits: ImageLimits) -> Image.Image:
    ok = (a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4)))) or (
        a.dtype == np.uint16 and a.ndim == 2
    )
    if not ok or 0 in a.shape:
        raise ImageError(
            f"array images must be [H, W], [H, W, 1|3|4] uint8 or [H, W] uint16, got shape {a.shape} dtype {a.dtype}"
        )
    _check_pixels((a.shape[1], a.shape[0]), "the image array", limits)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    return to_rgb(Image.fromarray(np.ascontiguousarray(a)), "the image array")


def _check_pixels(size: tuple[int, int], name: str, limits: ImageLimits) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"cannot decode {name} as an image: it is {w}x{h} pixels")
    if w * h > limits.max_pixels:
        raise ImageTooLargeError(
            f"{name} is {w}x{h} = {w * h:,} pixels, over the limit of {limits.max_pixels:,} "
            f"(downscale it, or raise the limit with {ENV_MAX_PIXELS})"
        )


def _bomb(name: str, e: Exception, limits: ImageLimits) -> str:
    """Pillow refused the header before we saw the size (over 2 x PIL.Image.MAX_IMAGE_PIXELS)."""
    found = re.search(r"\((\d+) pixels\)", str(e))
    size = f"{int(found.group(1)):,} pixels" if found else "more pixels than Pillow decodes"
    hint = f"raise {ENV_MAX_PIXELS}" + (
        " and PIL.Image.MAX_IMAGE_PIXELS" if limits.max_pixels > 2 * (Image.MAX_IMAGE_PIXELS or 0) else ""
    )
    return f"{name} is {size}, over the limit of {limits.max_pixels:,} (downscale it, or {hint})"


def _too_many_bytes(name: str, n: int, limits: ImageLimits) -> str:
    return f"{name} is {n:,} bytes, over the limit of {limits.max_bytes:,} (raise it with {ENV_MAX_BYTES})"


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
