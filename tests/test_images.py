"""The image contract (`vlm.images`): every input decodes to what a viewer shows, or is refused with an
ImageError naming the problem; limits hold before pixels are decoded; display copies stay small.
Property-based fuzzing of image bytes asserts: an RGB image or an ImageError, never anything else."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from lucid.errors import ImageError, LimitsError
from vlm.images import BACKGROUND, ImageLimits, display_copy, display_geometry, load_image, to_rgb
from vlm.layout import clip_geometry


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a few bytes of pixel data (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def palette_with_transparency() -> bytes:
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    return encode(p, "PNG", transparency=1)


def apng(colors, fmt="PNG") -> bytes:
    frames = [Image.new("RGB", (4, 4), c) for c in colors]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


GRAD16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)
WHITE = BACKGROUND

# (id, encoded bytes or in-memory image, expected pixel (0, 0) of the RGB result)
MODES = [
    ("RGB-png", encode(Image.new("RGB", (3, 2), (10, 20, 30)), "PNG"), (10, 20, 30)),
    ("L-png", encode(Image.new("L", (3, 2), 77), "PNG"), (77, 77, 77)),
    ("1-png", encode(Image.new("1", (3, 2), 1), "PNG"), (255, 255, 255)),
    ("P-png", encode(Image.new("RGB", (3, 2), (0, 0, 255)).convert("P"), "PNG"), (0, 0, 255)),
    ("P+transparency-png", palette_with_transparency(), (255, 0, 0)),
    ("L+transparency-png", encode(Image.new("L", (1, 1), 7), "PNG", transparency=7), WHITE),
    ("RGB+colour-key-png", encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG", transparency=(1, 2, 3)), WHITE),
    ("LA-png-half", encode(Image.new("LA", (1, 1), (0, 128)), "PNG"), (127, 127, 127)),
    ("RGBA-png-clear", encode(Image.new("RGBA", (1, 1), (0, 0, 0, 0)), "PNG"), WHITE),
    ("RGBA-png-opaque", encode(Image.new("RGBA", (1, 1), (9, 8, 7, 255)), "PNG"), (9, 8, 7)),
    ("I;16-png", encode(Image.fromarray(np.full((2, 2), 32896, np.uint16)), "PNG"), (128, 128, 128)),
    ("I;16-tiff", encode(Image.fromarray(np.full((2, 2), 65535, np.uint16)), "TIFF"), (255, 255, 255)),
    ("I-ppm16", b"P5 2 1 65535\n" + np.array([32896, 0], ">u2").tobytes(), (128, 128, 128)),
    ("CMYK-jpeg", encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100), (255, 0, 0)),
    ("CMYK-tiff", encode(Image.new("CMYK", (1, 1), (0, 255, 255, 0)), "TIFF"), (255, 0, 0)),
    ("LAB-tiff", encode(Image.new("LAB", (1, 1), (128, 128, 128)), "TIFF"), (119, 119, 119)),
    ("PA-tiff", encode(Image.new("PA", (1, 1), (0, 0)), "TIFF"), WHITE),
    ("RGBA-webp-clear", encode(Image.new("RGBA", (2, 2), (0, 0, 0, 0)), "WEBP", lossless=True), WHITE),
    ("RGB-bmp", encode(Image.new("RGB", (2, 2), (1, 2, 3)), "BMP"), (1, 2, 3)),
    ("P-gif", encode(Image.new("RGB", (2, 2), (255, 0, 0)), "GIF"), (255, 0, 0)),
    ("gif-first-frame", apng([(255, 0, 0), (0, 255, 0)], "GIF"), (255, 0, 0)),
    ("apng-first-frame", apng([(255, 0, 0), (0, 255, 0), (0, 0, 255)]), (255, 0, 0)),
    ("tiff-first-page", apng([(0, 255, 0), (255, 0, 0)], "TIFF"), (0, 255, 0)),
    ("YCbCr-memory", Image.new("YCbCr", (1, 1), (128, 128, 128)), (128, 128, 128)),
    ("HSV-memory", Image.new("HSV", (1, 1), (0, 255, 255)), (255, 0, 0)),
    ("RGBa-memory", Image.new("RGBa", (1, 1), (50, 50, 50, 128)), (177, 177, 177)),
    ("La-memory", Image.new("La", (1, 1), (50, 128)), (177, 177, 177)),
    ("uint8-array-rgba", np.zeros((2, 2, 4), np.uint8), WHITE),
    ("uint16-array", np.full((2, 2), 65535, np.uint16), (255, 255, 255)),
]


@pytest.mark.parametrize("source,expected", [m[1:] for m in MODES], ids=[m[0] for m in MODES])
def test_every_mode_becomes_the_rgb_a_viewer_shows(source, expected):
    out = load_image(source)
    assert out.mode == "RGB"
    got = out.getpixel((0, 0))
    assert all(abs(a - b) <= 2 for a, b in zip(got, expected)), (got, expected)  # JPEG/CMYK rounding


def test_16_bit_gradient_maps_to_the_right_8_bit_values():
    """Row of the issue: a 16-bit grayscale PNG used to become all white."""
    out = np.asarray(load_image(encode(Image.fromarray(GRAD16), "PNG")))
    expected = np.rint(GRAD16 / 257.0).astype(np.uint8)  # round(v * 255 / 65535)
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 1], out[..., 2])
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) == 256


@pytest.mark.parametrize(
    "source,needle",
    [
        (encode(Image.new("I", (2, 2), 5), "TIFF"), "32-bit integer"),
        (encode(Image.new("F", (2, 2), 0.5), "TIFF"), "floating-point"),
        (Image.new("I", (2, 2)), "no defined white level"),
        (encode(Image.new("RGB", (2, 2)), "TGA"), "not a PNG, JPEG"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a PNG, JPEG"),
        (b"GIF89a garbage", "cannot decode"),
        (np.zeros((2, 2, 2), np.uint8), "array images must be"),
        (np.zeros((2, 2, 3), np.float32), "array images must be"),
    ],
    ids=["I-tiff", "F-tiff", "I-memory", "tga", "eps", "garbage-gif", "2-channel-array", "float-array"],
)
def test_unsupported_inputs_are_refused_by_name(source, needle):
    with pytest.raises(ImageError, match=needle):
        load_image(source)


def test_exif_orientation_6_is_applied():
    """Row of the issue: a 300x150 JPEG with orientation 6 is shown (and must be seen) as 150x300."""
    im = Image.new("RGB", (300, 150), (200, 30, 30))
    im.paste((0, 0, 255), (0, 0, 20, 20))  # a blue marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    out = load_image(encode(im, "JPEG", exif=exif, quality=95))
    assert out.size == (150, 300)
    r, g, b = out.getpixel((140, 8))  # rotated 90 degrees clockwise: the marker is now top-right
    assert b > 200 and r < 60


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillows_reference(orientation):
    rng = np.random.default_rng(orientation)
    im = Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(im, "PNG", exif=exif)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(np.asarray(load_image(data)), np.asarray(reference))


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    """Row of the issue: a PNG whose header claims 50000x50000 gave a DecompressionBombError traceback."""
    with pytest.raises(ImageError, match="is 2,500,000,000 pixels, over the limit of 150,000,000"):
        load_image(png_header_only(50000, 50000))
    with pytest.raises(ImageError, match=r"12000x12000 = 144,000,000 pixels, over the limit of 1,000,000"):
        load_image(png_header_only(12000, 12000), ImageLimits(max_pixels=1_000_000))
    # (the files hold a header only: a decoder that got past the header check would fail differently)


def test_byte_and_frame_limits(tmp_path):
    data = encode(Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(ImageError, match="over the limit of 10 .*LUCID_MAX_IMAGE_BYTES"):
        load_image(data, ImageLimits(max_bytes=10))
    f = tmp_path / "a.png"
    f.write_bytes(data)
    with pytest.raises(ImageError, match="bytes, over the limit"):
        load_image(f, ImageLimits(max_bytes=10))
    with pytest.raises(ImageError, match="3 frames, over the limit of 2"):
        load_image(apng([(1, 1, 1)] * 3), ImageLimits(max_frames=2))
    assert load_image(apng([(1, 1, 1)] * 3), ImageLimits(max_frames=3)).size == (4, 4)


def test_limits_from_environment(monkeypatch):
    monkeypatch.setenv("LUCID_MAX_IMAGE_PIXELS", "100")
    with pytest.raises(ImageError, match="over the limit of 100"):
        load_image(Image.new("RGB", (20, 20)))
    monkeypatch.setenv("LUCID_MAX_IMAGE_PIXELS", "many")
    with pytest.raises(LimitsError, match="LUCID_MAX_IMAGE_PIXELS='many' is not an integer"):
        load_image(Image.new("RGB", (2, 2)))
    monkeypatch.setenv("LUCID_MAX_IMAGE_PIXELS", "-3")
    with pytest.raises(LimitsError, match="positive"):
        ImageLimits.from_env()
    monkeypatch.delenv("LUCID_MAX_IMAGE_PIXELS")
    assert ImageLimits.from_env() == ImageLimits()
    with pytest.raises(LimitsError):
        ImageLimits(max_frames=0)


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda d: d / "missing.png", "not found"),
        (lambda d: d, "is a directory"),
        (lambda d: (d / "empty.png").write_bytes(b"") or d / "empty.png", "empty"),
        (lambda d: "/dev/null", "not a regular file"),
        (lambda d: str(d / "a\0b.png"), "cannot read"),
    ],
    ids=["missing", "directory", "empty", "device", "nul-in-path"],
)
def test_bad_paths(tmp_path, make, needle):
    with pytest.raises(ImageError, match=needle):
        load_image(make(tmp_path))


def test_display_copy_is_bounded_and_reports_its_scale():
    big = Image.new("RGB", (12000, 12000), (90, 90, 90))
    small, scale = display_copy(big)
    assert small.size == (1024, 1024) and scale == 1024 / 12000
    assert small.getpixel((500, 500)) == (90, 90, 90)
    wide, s = display_copy(Image.new("RGB", (5000, 3)), max_side=1000)
    assert wide.size == (1000, 1) and s == 0.2
    tiny = Image.new("RGB", (300, 150), (1, 2, 3))
    same, s = display_copy(tiny)
    assert s == 1.0 and same is not tiny and np.array_equal(np.asarray(same), np.asarray(tiny))


def test_display_geometry_maps_display_pixels_exactly():
    g = clip_geometry((3000, 2000), 336, None, (336, 336))
    small, s = display_copy(Image.new("RGB", g.original_size))
    dg = display_geometry(g, small.size)
    xy = np.array([[10.0, 20.0], [1023.0, 682.0], [512.5, 300.25]])
    orig = xy * np.array([g.original_size[0] / small.width, g.original_size[1] / small.height])
    assert np.allclose(dg.to_processed(xy), g.to_processed(orig))
    assert dg.original_size == small.size and dg.processed_size == g.processed_size


def test_to_rgb_keeps_rgb_untouched():
    im = Image.new("RGB", (2, 2), (4, 5, 6))
    assert to_rgb(im) is im


# ---- fuzzing: an RGB image or an ImageError, never another exception and never a silent mis-read ----

SEEDS = [
    encode(Image.new("RGB", (8, 6), (10, 20, 30)), "PNG"),
    encode(Image.fromarray(GRAD16[:8, :8]), "PNG"),
    encode(Image.new("RGBA", (6, 6), (10, 20, 30, 100)), "PNG"),
    palette_with_transparency(),
    encode(Image.new("RGB", (16, 16), (200, 10, 10)), "JPEG"),
    encode(Image.new("CMYK", (8, 8), (10, 20, 30, 40)), "JPEG"),
    apng([(1, 2, 3), (4, 5, 6)], "GIF"),
    apng([(1, 2, 3), (4, 5, 6)]),
    encode(Image.new("RGB", (5, 5), (1, 2, 3)), "BMP"),
    encode(Image.fromarray(GRAD16[:4, :4]), "TIFF"),
    encode(Image.new("RGBA", (4, 4), (1, 2, 3, 4)), "WEBP", lossless=True),
    b"P6 3 2 255\n" + bytes(range(18)),
]
FUZZ_LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=4_000_000, max_frames=64)


def _decodes_or_refuses(data: bytes) -> None:
    try:
        out = load_image(data, FUZZ_LIMITS)
    except ImageError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert out.mode == "RGB" and out.width * out.height <= FUZZ_LIMITS.max_pixels
    out.getpixel((0, 0))  # the pixels are really there


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data):
    _decodes_or_refuses(data)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_fuzz_mutated_image_files(seed, edits, cut):
    data = bytearray(seed)
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _decodes_or_refuses(bytes(data))


@settings(max_examples=40, deadline=None)
@given(
    mode=st.sampled_from(["L", "RGB", "RGBA", "LA", "I;16"]),
    w=st.integers(1, 24),
    h=st.integers(1, 24),
    seed=st.integers(0, 2**32 - 1),
    fmt=st.sampled_from(["PNG", "TIFF"]),
)
def test_fuzz_valid_images_decode_exactly(mode, w, h, seed, fmt):
    """Lossless files of random content: the RGB result is the documented conversion, pixel for pixel."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        a = rng.integers(0, 65536, (h, w), dtype=np.uint16)
        im, expected = Image.fromarray(a), np.repeat(np.rint(a / 257.0).astype(np.uint8)[..., None], 3, -1)
    else:
        channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2}[mode]
        a = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        im = Image.fromarray(a[..., 0] if channels == 1 else a, mode=mode)
        color = np.repeat(a[..., :1], 3, -1) if channels <= 2 else a[..., :3]
        if channels in (2, 4):  # alpha composited on white
            alpha = a[..., -1:].astype(np.float64) / 255.0
            expected = color * alpha + np.array(WHITE) * (1 - alpha)
        else:
            expected = color
    out = np.asarray(load_image(encode(im, fmt)), dtype=np.float64)
    assert out.shape == (h, w, 3)
    assert np.abs(out - expected).max() <= 1.0  # Pillow's integer alpha blending rounds
