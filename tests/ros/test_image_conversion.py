"""Image <-> numpy for every encoding: layouts built independently of the code under test, then read back."""

from __future__ import annotations

import sys

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from pixel_sail_ros.ros.image_conversion import (
    ImageConversionError,
    compressed_to_rgb8,
    depth_to_meters,
    encoding_info,
    image_to_numpy,
    numpy_to_image,
    rgb8_to_compressed,
    supported_encodings,
    to_rgb8,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The table the code must agree with, written out by hand (not derived from the module).
EXPECTED = {
    "mono8": (np.uint8, 1), "mono16": (np.uint16, 1), "rgb8": (np.uint8, 3), "bgr8": (np.uint8, 3),
    "rgba8": (np.uint8, 4), "bgra8": (np.uint8, 4), "rgb16": (np.uint16, 3), "bgr16": (np.uint16, 3),
    "rgba16": (np.uint16, 4), "bgra16": (np.uint16, 4),
    "bayer_rggb8": (np.uint8, 1), "bayer_bggr16": (np.uint16, 1), "yuv422": (np.uint8, 2),
    **{f"{d}C{n}": (t, n) for d, t in [("8U", np.uint8), ("8S", np.int8), ("16U", np.uint16), ("16S", np.int16),
                                        ("32S", np.int32), ("32F", np.float32), ("64F", np.float64)]
       for n in (1, 2, 3, 4)},
}
ENCODINGS = sorted(EXPECTED)


def random_pixels(rng: np.random.Generator, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return rng.normal(0, 1e3, shape).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, shape, dtype=dt, endpoint=True)


def handmade_image(arr: np.ndarray, encoding: str, pad: int, big: bool) -> Image:
    """An Image laid out by hand: explicit byte order, `pad` garbage bytes after each row."""
    h, w = arr.shape[:2]
    swapped = arr.astype(arr.dtype.newbyteorder(">" if big else "<"))
    rows = np.ascontiguousarray(swapped).reshape(h, -1).view(np.uint8).reshape(h, -1)
    padded = np.concatenate([rows, np.full((h, pad), 0xAB, np.uint8)], axis=1)
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=int(big), step=rows.shape[1] + pad)
    msg.data = padded.tobytes()
    return msg


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact equality (NaN payloads included)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_encoding_table_matches_the_contract():
    for enc, (dtype, channels) in EXPECTED.items():
        info = encoding_info(enc)
        assert info.dtype == np.dtype(dtype) and info.channels == channels, enc
    assert set(EXPECTED) - {"bayer_rggb8", "bayer_bggr16", "yuv422"} <= set(supported_encodings())


@SETTINGS
@given(enc=st.sampled_from(ENCODINGS), h=st.integers(1, 9), w=st.integers(1, 9), pad=st.integers(0, 7),
       big=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_read_handmade_layouts(enc, h, w, pad, big, seed):
    dtype, c = EXPECTED[enc]
    arr = random_pixels(np.random.default_rng(seed), dtype, (h, w) if c == 1 else (h, w, c))
    out = image_to_numpy(handmade_image(arr, enc, pad, big))
    assert out.dtype.isnative
    assert same(np.ascontiguousarray(out), arr)


@SETTINGS
@given(enc=st.sampled_from(ENCODINGS), h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
def test_round_trip(enc, h, w, seed):
    dtype, c = EXPECTED[enc]
    arr = random_pixels(np.random.default_rng(seed), dtype, (h, w) if c == 1 else (h, w, c))
    header = Header(frame_id="cam_optical")
    msg = numpy_to_image(arr, enc, header)
    assert (msg.height, msg.width, msg.encoding) == (h, w, enc)
    assert msg.step == w * c * np.dtype(dtype).itemsize
    assert len(msg.data) == msg.step * h
    assert msg.is_bigendian == int(sys.byteorder == "big" and np.dtype(dtype).itemsize > 1)
    assert msg.header.frame_id == "cam_optical"
    assert same(image_to_numpy(msg), arr)
    assert same(image_to_numpy(msg, copy=True), arr)


def test_numpy_to_image_accepts_non_native_byte_order():
    arr = np.arange(12, dtype=">u2").reshape(3, 4)
    assert same(image_to_numpy(numpy_to_image(arr, "mono16")), arr.astype(np.uint16))


def test_unpadded_read_is_a_view_and_copy_detaches():
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    msg = numpy_to_image(arr, "rgb8")
    view = image_to_numpy(msg)
    assert np.shares_memory(view, np.frombuffer(msg.data, np.uint8))
    copied = image_to_numpy(msg, copy=True)
    assert not np.shares_memory(copied, np.frombuffer(msg.data, np.uint8)) and copied.flags.c_contiguous


def test_unaligned_step_gives_an_aligned_copy():
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = image_to_numpy(handmade_image(arr, "32FC1", pad=1, big=False))
    assert out.flags.aligned and out.flags.c_contiguous and same(out, arr)


# ---------------------------------------------------------------------------------------------- errors

def bad(msg: Image, *words: str, **kw) -> None:
    with pytest.raises(ImageConversionError) as exc:
        image_to_numpy(msg, **kw)
    for word in words:
        assert word in str(exc.value), (word, str(exc.value))


def test_unknown_encoding():
    msg = numpy_to_image(np.zeros((2, 2), np.uint8), "mono8")
    msg.encoding = "mono12"
    bad(msg, "unknown image encoding", "'mono12'")
    msg.encoding = "8UC0"
    bad(msg, "unknown")


@pytest.mark.parametrize("h,w", [(0, 4), (4, 0), (0, 0)])
def test_zero_size(h, w):
    bad(Image(height=h, width=w, encoding="mono8", step=w), "empty image")


def test_step_too_small():
    msg = numpy_to_image(np.zeros((4, 5, 3), np.uint8), "rgb8")
    msg.step = 14
    bad(msg, "step 14", "15")


def test_data_truncated_and_too_long():
    msg = numpy_to_image(np.zeros((4, 5), np.uint16), "mono16")
    msg.data = msg.data[:-1]
    bad(msg, "truncated", "39 bytes")
    msg.data = bytes(41)
    bad(msg, "41 bytes", "more than")


def test_max_pixels():
    msg = numpy_to_image(np.zeros((10, 10), np.uint8), "mono8")
    bad(msg, "above the limit of 99", max_pixels=99)
    assert image_to_numpy(msg, max_pixels=100).shape == (10, 10)


@SETTINGS
@given(enc=st.sampled_from(ENCODINGS), h=st.integers(1, 6), w=st.integers(1, 6), pad=st.integers(0, 5),
       cut=st.integers(1, 40), big=st.booleans())
def test_any_truncation_is_rejected(enc, h, w, pad, cut, big):
    dtype, c = EXPECTED[enc]
    arr = np.zeros((h, w) if c == 1 else (h, w, c), dtype)
    msg = handmade_image(arr, enc, pad, big)
    msg.data = msg.data[: max(0, len(msg.data) - cut)]
    bad(msg, "truncated")


@SETTINGS
@given(enc=st.sampled_from(ENCODINGS + ["", "rgb", "bgr9", "32FC", "nv12", "16UC1 "]),
       h=st.integers(0, 8), w=st.integers(0, 8), step=st.integers(0, 300), n=st.integers(0, 600),
       big=st.integers(0, 255))
def test_garbage_headers_never_escape_as_other_errors(enc, h, w, step, n, big):
    msg = Image(height=h, width=w, encoding=enc, step=step, is_bigendian=big)
    msg.data = bytes(n)
    try:
        out = image_to_numpy(msg)
    except ImageConversionError:
        return
    assert out.shape[:2] == (h, w)
    rgb = None
    try:
        rgb = to_rgb8(msg)
    except ImageConversionError:
        pass
    if rgb is not None:
        assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8


def test_numpy_to_image_rejects_mismatches():
    with pytest.raises(ImageConversionError, match="3 channel"):
        numpy_to_image(np.zeros((2, 2, 4), np.uint8), "rgb8")
    with pytest.raises(ImageConversionError, match="needs dtype uint8"):
        numpy_to_image(np.zeros((2, 2, 3), np.float32), "rgb8")
    with pytest.raises(ImageConversionError, match="empty image"):
        numpy_to_image(np.zeros((0, 2), np.uint8), "mono8")
    with pytest.raises(ImageConversionError, match="unknown"):
        numpy_to_image(np.zeros((2, 2), np.uint8), "grey")
    with pytest.raises(ImageConversionError, match="shape"):
        numpy_to_image(np.zeros(4, np.uint8), "mono8")


# --------------------------------------------------------------------------------------------- to_rgb8

def test_to_rgb8_colour_orders_and_depths():
    rgb = np.array([[[10, 20, 30], [200, 100, 0]]], np.uint8)
    alpha = np.full((1, 2, 1), 7, np.uint8)
    assert same(to_rgb8(numpy_to_image(rgb, "rgb8")), rgb)
    assert same(to_rgb8(numpy_to_image(rgb[:, :, ::-1].copy(), "bgr8")), rgb)
    assert same(to_rgb8(numpy_to_image(np.concatenate([rgb, alpha], 2), "rgba8")), rgb)
    assert same(to_rgb8(numpy_to_image(np.concatenate([rgb[:, :, ::-1], alpha], 2), "bgra8")), rgb)
    rgb16 = rgb.astype(np.uint16) * 256 + 255
    assert same(to_rgb8(numpy_to_image(rgb16, "rgb16")), rgb)
    assert same(to_rgb8(numpy_to_image(rgb16[:, :, ::-1].copy(), "bgr16")), rgb)
    a16 = np.full((1, 2, 1), 9, np.uint16)
    assert same(to_rgb8(numpy_to_image(np.concatenate([rgb16[:, :, ::-1], a16], 2), "bgra16")), rgb)
    assert same(to_rgb8(numpy_to_image(np.concatenate([rgb16, a16], 2), "rgba16")), rgb)


def test_to_rgb8_mono_replicates_grey():
    grey = np.array([[0, 128, 255]], np.uint8)
    out = to_rgb8(numpy_to_image(grey, "mono8"))
    assert same(out, np.repeat(grey[:, :, None], 3, 2))
    out16 = to_rgb8(numpy_to_image(np.array([[0, 256 * 128, 65535]], np.uint16), "mono16"))
    assert same(out16, np.repeat(grey[:, :, None], 3, 2))


def test_to_rgb8_padded_big_endian_bgr16():
    rgb = np.random.default_rng(1).integers(0, 256, (3, 5, 3)).astype(np.uint8)
    msg = handmade_image((rgb[:, :, ::-1].astype(np.uint16) << 8), "bgr16", pad=6, big=True)
    out = to_rgb8(msg)
    assert out.flags.c_contiguous and same(out, rgb)


@pytest.mark.parametrize("enc", ["bgr8", "bgra8", "rgba8", "rgb8", "mono8", "mono16", "rgb16"])
@pytest.mark.parametrize("pad", [0, 5])
def test_to_rgb8_padded_rows(enc, pad):
    dtype, c = EXPECTED[enc]
    rng = np.random.default_rng(pad)
    rgb = rng.integers(0, 256, (7, 9, 3)).astype(np.uint8)
    if c == 1:
        rgb = np.repeat(rgb[:, :, :1], 3, 2)
        src = rgb[:, :, 0]
    else:
        src = rgb[:, :, ::-1] if enc.startswith("bgr") else rgb
        if c == 4:
            src = np.concatenate([src, np.full((7, 9, 1), 77, np.uint8)], 2)
    src = src.astype(dtype) * (257 if dtype == np.uint16 else 1)
    out = to_rgb8(handmade_image(np.ascontiguousarray(src), enc, pad, big=False))
    assert out.flags.c_contiguous and same(out, rgb)


@pytest.mark.parametrize("enc", ["32FC1", "8UC3", "16SC1", "64FC4"])
def test_to_rgb8_rejects_non_colour(enc):
    dtype, c = EXPECTED[enc]
    msg = numpy_to_image(np.zeros((2, 2) if c == 1 else (2, 2, c), dtype), enc)
    with pytest.raises(ImageConversionError, match="no colour meaning"):
        to_rgb8(msg)


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
@pytest.mark.parametrize("bits", [8, 16])
def test_bayer_demosaic_uniform_colour(pattern, bits):
    colour = {"r": 200, "g": 90, "b": 20}
    h, w = 8, 10
    mosaic = np.zeros((h, w), np.uint16 if bits == 16 else np.uint8)
    scale = 257 if bits == 16 else 1
    for dy in range(2):
        for dx in range(2):
            mosaic[dy::2, dx::2] = colour[pattern[2 * dy + dx]] * scale
    out = to_rgb8(numpy_to_image(mosaic, f"bayer_{pattern}{bits}"))
    assert out.shape == (h, w, 3)
    assert np.abs(out[2:-2, 2:-2].astype(int) - [200, 90, 20]).max() <= 1


@pytest.mark.parametrize("enc,code", [("yuv422", cv2.COLOR_RGB2YUV_UYVY), ("yuv422_yuy2", cv2.COLOR_RGB2YUV_YUY2)])
def test_yuv422_decodes(enc, code):
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:] = (180, 60, 30)
    msg = numpy_to_image(cv2.cvtColor(rgb, code), enc)
    assert np.abs(to_rgb8(msg).astype(int) - rgb).max() <= 3
    odd = Image(height=2, width=3, encoding=enc, step=6, data=bytes(12))
    with pytest.raises(ImageConversionError, match="even"):
        to_rgb8(odd)


# ------------------------------------------------------------------------------------------ compressed

def smooth_image(h: int = 48, w: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 128)], 2).astype(np.uint8)


def test_png_round_trip_is_exact():
    rgb = np.random.default_rng(0).integers(0, 256, (17, 23, 3)).astype(np.uint8)
    msg = rgb8_to_compressed(rgb, "png", Header(frame_id="f"))
    assert isinstance(msg, CompressedImage) and "png" in msg.format and msg.header.frame_id == "f"
    assert same(compressed_to_rgb8(msg), rgb)


def test_jpeg_round_trip_is_close():
    rgb = smooth_image()
    msg = rgb8_to_compressed(rgb, "jpeg")
    assert "jpeg" in msg.format and bytes(msg.data[:2]) == b"\xff\xd8"
    out = compressed_to_rgb8(msg)
    assert out.shape == rgb.shape and np.abs(out.astype(int) - rgb).mean() < 3


def test_grey_png_decodes_to_rgb():
    grey = np.arange(30, dtype=np.uint8).reshape(5, 6)
    out = compressed_to_rgb8(rgb8_to_compressed(grey, "png"))
    assert same(out, np.repeat(grey[:, :, None], 3, 2))


def test_compressed_errors():
    with pytest.raises(ImageConversionError, match="could not decode"):
        compressed_to_rgb8(CompressedImage(format="jpeg", data=b"not a jpeg at all"))
    with pytest.raises(ImageConversionError, match="no data"):
        compressed_to_rgb8(CompressedImage(format="jpeg"))
    png = rgb8_to_compressed(smooth_image(), "png")
    corrupt = CompressedImage(format="png", data=bytes(png.data[: len(png.data) // 2]))
    with pytest.raises(ImageConversionError, match="could not decode"):
        compressed_to_rgb8(corrupt)
    with pytest.raises(ImageConversionError, match="compressedDepth"):
        compressed_to_rgb8(CompressedImage(format="16UC1; compressedDepth png", data=png.data))
    with pytest.raises(ImageConversionError, match="unsupported compressed format"):
        rgb8_to_compressed(smooth_image(), "bmp")
    with pytest.raises(ImageConversionError, match="uint8"):
        rgb8_to_compressed(smooth_image().astype(np.float32), "png")


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_compressed_size_limit_checked_before_decoding(fmt, monkeypatch):
    msg = rgb8_to_compressed(smooth_image(48, 64), fmt)
    calls = []
    monkeypatch.setattr(cv2, "imdecode", lambda *a: calls.append(a))
    with pytest.raises(ImageConversionError, match="64x48 has 3072 pixels"):
        compressed_to_rgb8(msg, max_pixels=3000)
    assert calls == []  # refused from the header alone


@SETTINGS
@given(data=st.binary(max_size=200), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8"]))
def test_random_bytes_never_escape_as_other_errors(data, prefix):
    try:
        out = compressed_to_rgb8(CompressedImage(format="jpeg", data=prefix + data))
    except ImageConversionError:
        return
    assert out.ndim == 3 and out.shape[2] == 3


# ----------------------------------------------------------------------------------------------- depth

def test_depth_16uc1_millimetres():
    mm = np.array([[0, 1000, 1500, 65535]], np.uint16)
    out = depth_to_meters(numpy_to_image(mm, "16UC1"))
    assert out.dtype == np.float32 and out.shape == (1, 4)
    assert np.isnan(out[0, 0])
    assert out[0, 1:].tolist() == [1.0, 1.5, np.float32(65.535)]


def test_depth_16uc1_big_endian_padded():
    mm = np.array([[250, 0], [3000, 12]], np.uint16)
    out = depth_to_meters(handmade_image(mm, "16UC1", pad=3, big=True))
    np.testing.assert_allclose(out, [[0.25, np.nan], [3.0, 0.012]], rtol=1e-6)


def test_depth_32fc1_metres_and_invalid_values():
    m = np.array([[0.0, np.nan, np.inf, -1.0, 2.5, -np.inf]], np.float32)
    msg = numpy_to_image(m, "32FC1")
    out = depth_to_meters(msg)
    assert np.isnan(out[0, [0, 1, 2, 3, 5]]).all() and out[0, 4] == 2.5
    assert np.isinf(image_to_numpy(msg)[0, 2])  # the message itself is untouched


@pytest.mark.parametrize("enc,dtype", [("rgb8", np.uint8), ("32FC3", np.float32), ("64FC1", np.float64)])
def test_depth_rejects_other_encodings(enc, dtype):
    c = EXPECTED[enc][1]
    msg = numpy_to_image(np.zeros((2, 2) if c == 1 else (2, 2, c), dtype), enc)
    with pytest.raises(ImageConversionError, match="16UC1.*32FC1"):
        depth_to_meters(msg)
