"""sensor_msgs/Image and CompressedImage <-> numpy, without cv_bridge.

No cv_bridge works with the registry wheels and NumPy 2 (docs/ros_wheels_recipe.md §7), so the conversion
lives here. Every function validates the message before touching its bytes: a driver that sends a wrong
``step``, truncated ``data`` or an unknown encoding gets an :class:`ImageConversionError` whose message says
what is wrong, never a numpy traceback or a silently garbled array.

Reading is copy-free where the layout allows it: the returned array is a view of ``msg.data`` (so it
shares memory with the message) unless rows are padded to an unaligned ``step``, the byte order is not
native, or ``copy=True`` is passed.
"""

from __future__ import annotations

import array
import re
import struct
import sys
from typing import NamedTuple

import numpy as np
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageConversionError",
    "EncodingInfo",
    "encoding_info",
    "supported_encodings",
    "image_to_numpy",
    "numpy_to_image",
    "to_rgb8",
    "compressed_to_rgb8",
    "rgb8_to_compressed",
    "depth_to_meters",
]

DEFAULT_MAX_PIXELS = 8192 * 8192
"""Largest width*height accepted by default: bounds the memory a single malicious frame can claim."""

_NATIVE_BIG = sys.byteorder == "big"


class ImageConversionError(ValueError):
    """An image message (or array) that cannot be converted; the message names the problem."""


class EncodingInfo(NamedTuple):
    """How one ROS encoding lays out a pixel: numpy scalar type (native order) and channel count."""

    dtype: np.dtype
    channels: int


_U8, _U16 = np.dtype(np.uint8), np.dtype(np.uint16)

_NAMED: dict[str, EncodingInfo] = {
    "mono8": EncodingInfo(_U8, 1),
    "mono16": EncodingInfo(_U16, 1),
    "rgb8": EncodingInfo(_U8, 3),
    "bgr8": EncodingInfo(_U8, 3),
    "rgba8": EncodingInfo(_U8, 4),
    "bgra8": EncodingInfo(_U8, 4),
    "rgb16": EncodingInfo(_U16, 3),
    "bgr16": EncodingInfo(_U16, 3),
    "rgba16": EncodingInfo(_U16, 4),
    "bgra16": EncodingInfo(_U16, 4),
    # Raw Bayer mosaics: one sample per pixel; to_rgb8 demosaics them.
    **{f"bayer_{p}{b}": EncodingInfo(_U8 if b == 8 else _U16, 1)
       for p in ("rggb", "bggr", "gbrg", "grbg") for b in (8, 16)},
    # Packed 4:2:2: two bytes per pixel. "yuv422" is UYVY (ROS convention), "yuv422_yuy2" is YUYV.
    "yuv422": EncodingInfo(_U8, 2),
    "uyvy": EncodingInfo(_U8, 2),
    "yuv422_yuy2": EncodingInfo(_U8, 2),
    "yuyv": EncodingInfo(_U8, 2),
}

_DEPTHS = {"8U": np.uint8, "8S": np.int8, "16U": np.uint16, "16S": np.int16,
           "32S": np.int32, "32F": np.float32, "64F": np.float64}
_GENERIC = re.compile(r"^(8U|8S|16U|16S|32S|32F|64F)C([1-9][0-9]{0,2})$")
_MAX_CHANNELS = 512  # OpenCV's CV_CN_MAX: the largest "NC" the generic names can carry


def supported_encodings() -> list[str]:
    """The named encodings plus the generic ``{8U,8S,16U,16S,32S,32F,64F}C{1..4}`` ones (more channels parse too)."""
    generic = [f"{d}C{n}" for d in _DEPTHS for n in range(1, 5)]
    return sorted(_NAMED) + generic


def encoding_info(encoding: str) -> EncodingInfo:
    """(dtype, channels) for a ROS encoding string; ImageConversionError for an unknown one."""
    info = _NAMED.get(encoding)
    if info is not None:
        return info
    m = _GENERIC.match(encoding)
    if m and int(m.group(2)) <= _MAX_CHANNELS:
        return EncodingInfo(np.dtype(_DEPTHS[m.group(1)]), int(m.group(2)))
    raise ImageConversionError(
        f"unknown image encoding {encoding!r}; supported: {', '.join(sorted(_NAMED))} and "
        "{8U,8S,16U,16S,32S,32F,64F}C{n}")


def _check_size(width: int, height: int, max_pixels: int | None) -> None:
    if width <= 0 or height <= 0:
        raise ImageConversionError(f"empty image: width={width}, height={height}")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageConversionError(
            f"image {width}x{height} has {width * height} pixels, above the limit of {max_pixels}")


def image_to_numpy(msg: Image, *, copy: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The pixels of ``msg`` as an (H, W) array (one channel) or (H, W, C), in native byte order.

    ``step`` padding is honoured with a strided view; the result is a view of ``msg.data`` when the layout
    allows it (``copy=True`` always returns a fresh C-contiguous array that does not alias the message).
    """
    info = encoding_info(msg.encoding)
    width, height, step = int(msg.width), int(msg.height), int(msg.step)
    _check_size(width, height, max_pixels)
    itemsize = info.dtype.itemsize
    row_bytes = width * info.channels * itemsize
    if step < row_bytes:
        raise ImageConversionError(
            f"step {step} is smaller than width*channels*bytes = {width}*{info.channels}*{itemsize} = {row_bytes} "
            f"for encoding {msg.encoding!r}")
    need = step * height
    buf = np.frombuffer(msg.data, dtype=np.uint8) if len(msg.data) else np.empty(0, np.uint8)
    if buf.size < need:
        raise ImageConversionError(
            f"data has {buf.size} bytes, fewer than step*height = {step}*{height} = {need} (truncated image)")
    if buf.size > need:
        raise ImageConversionError(
            f"data has {buf.size} bytes, more than step*height = {step}*{height} = {need} (step or size is wrong)")

    big = bool(msg.is_bigendian)
    dtype = info.dtype.newbyteorder(">" if big else "<") if itemsize > 1 else info.dtype
    shape: tuple[int, ...] = (height, width, info.channels)
    strides: tuple[int, ...] = (step, info.channels * itemsize, itemsize)
    out = np.ndarray(shape, dtype=dtype, buffer=buf, offset=0, strides=strides)
    if info.channels == 1:
        out = out[:, :, 0]
    if itemsize > 1 and big != _NATIVE_BIG:
        return out.astype(info.dtype, order="C")  # byte swap: one copy, native order
    if copy or not out.flags.aligned:
        return np.array(out, dtype=info.dtype, order="C", copy=True)  # e.g. a step that is not a multiple of 2/4/8
    return out


def _as_bytes_array(arr: np.ndarray) -> array.array:
    """A ``array.array('B')`` with the bytes of ``arr``: the setter's fast path (no per-element check)."""
    data = array.array("B")
    if arr.size:
        data.frombytes(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    return data


def numpy_to_image(array_: np.ndarray, encoding: str, header: Header | None = None) -> Image:
    """An Image message for ``array_`` (H, W) or (H, W, C), whose dtype and channels must match ``encoding``.

    The output is always packed (``step = width*channels*itemsize``) and in native byte order.
    """
    info = encoding_info(encoding)
    arr = np.asarray(array_)
    if arr.ndim == 2:
        channels = 1
    elif arr.ndim == 3:
        channels = arr.shape[2]
    else:
        raise ImageConversionError(f"expected an (H, W) or (H, W, C) array, got shape {arr.shape}")
    if channels != info.channels:
        raise ImageConversionError(
            f"encoding {encoding!r} has {info.channels} channel(s), the array has {channels} (shape {arr.shape})")
    if (arr.dtype.kind, arr.dtype.itemsize) != (info.dtype.kind, info.dtype.itemsize):
        raise ImageConversionError(f"encoding {encoding!r} needs dtype {info.dtype}, the array has {arr.dtype}")
    height, width = int(arr.shape[0]), int(arr.shape[1])
    _check_size(width, height, None)
    if not arr.dtype.isnative:
        arr = arr.astype(info.dtype)
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = height, width
    msg.encoding = encoding
    msg.is_bigendian = int(_NATIVE_BIG and info.dtype.itemsize > 1)
    msg.step = width * info.channels * info.dtype.itemsize
    msg.data = _as_bytes_array(arr)
    return msg


# ---------------------------------------------------------------------------------------------- colour

_MONO = {"mono8", "mono16", "8UC1", "16UC1"}
_BAYER_CODES = {"rggb": "COLOR_BayerRGGB2RGB", "bggr": "COLOR_BayerBGGR2RGB",
                "gbrg": "COLOR_BayerGBRG2RGB", "grbg": "COLOR_BayerGRBG2RGB"}
_YUV_CODES = {"yuv422": "COLOR_YUV2RGB_UYVY", "uyvy": "COLOR_YUV2RGB_UYVY",
              "yuv422_yuy2": "COLOR_YUV2RGB_YUY2", "yuyv": "COLOR_YUV2RGB_YUY2"}
_COLOUR = {"rgb8", "bgr8", "rgba8", "bgra8", "rgb16", "bgr16", "rgba16", "bgra16"}
_COLOUR_CODES = {"bgr": "COLOR_BGR2RGB", "rgba": "COLOR_RGBA2RGB", "bgra": "COLOR_BGRA2RGB"}  # "rgb": none


def _to_u8(arr: np.ndarray) -> np.ndarray:
    """16-bit samples to 8-bit by dropping the low byte (65535 -> 255), as cv_bridge scales them."""
    return arr if arr.dtype == np.uint8 else (arr >> 8).astype(np.uint8)


def to_rgb8(msg: Image, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The frame as a C-contiguous (H, W, 3) uint8 RGB array, the model's input format.

    Mono is replicated to grey, 16-bit is scaled to 8 bits, BGR is reordered, alpha is dropped, Bayer is
    demosaiced and YUV 4:2:2 is decoded. Encodings without a colour meaning (e.g. 32FC1, 8UC3) are rejected.
    An unpadded rgb8 frame comes back as a view of ``msg.data`` (no copy); every other one is a new array.
    """
    enc = msg.encoding
    if enc not in _MONO and enc not in _COLOUR and not enc.startswith("bayer_") and enc not in _YUV_CODES:
        encoding_info(enc)  # unknown encodings get the "unknown" message
        raise ImageConversionError(
            f"encoding {enc!r} has no colour meaning; camera frames must be rgb8, bgr8, rgba8, bgra8, mono8, mono16 "
            "(or their 16-bit, Bayer or yuv422 variants)")
    arr = image_to_numpy(msg, max_pixels=max_pixels)
    if enc == "rgb8":
        return np.ascontiguousarray(arr)  # unpadded: a view of msg.data, no copy
    import cv2  # SIMD channel shuffles: several times faster than numpy fancy indexing at 1080p

    if enc in _MONO:
        return cv2.cvtColor(np.ascontiguousarray(_to_u8(arr)), cv2.COLOR_GRAY2RGB)
    if enc in _COLOUR:
        u8 = _to_u8(arr)  # 16-bit: a new packed array; 8-bit: still the (maybe row-padded) view
        order = enc[:4] if enc[3] == "a" else enc[:3]
        if order == "rgb":
            return np.ascontiguousarray(u8)
        if u8.strides[1:] != (u8.shape[2], 1):  # cv2 reads row-padded views; other layouts need a copy
            u8 = np.ascontiguousarray(u8)
        return cv2.cvtColor(u8, getattr(cv2, _COLOUR_CODES[order]))
    if enc.startswith("bayer_"):
        if arr.shape[0] < 2 or arr.shape[1] < 2:
            raise ImageConversionError(f"a Bayer image needs at least 2x2 pixels, got {arr.shape[1]}x{arr.shape[0]}")
        rgb = cv2.cvtColor(np.ascontiguousarray(arr), getattr(cv2, _BAYER_CODES[enc[6:10]]))
        return np.ascontiguousarray(_to_u8(rgb))
    if arr.shape[1] % 2:
        raise ImageConversionError(f"{enc!r} packs pixel pairs: the width must be even, got {arr.shape[1]}")
    return cv2.cvtColor(np.ascontiguousarray(arr), getattr(cv2, _YUV_CODES[enc]))


# ------------------------------------------------------------------------------------------ compressed

def _peek_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header without decoding, to refuse decompression bombs early."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        return w, h
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 <= len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
                return None
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
                i += 2
                continue
            length = struct.unpack(">H", data[i + 2:i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return w, h
            i += 2 + length
    return None


def compressed_to_rgb8(msg: CompressedImage, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a JPEG/PNG (any format OpenCV reads) CompressedImage to (H, W, 3) uint8 RGB."""
    import cv2

    fmt = str(msg.format)
    if "compresseddepth" in fmt.lower().replace(" ", ""):
        raise ImageConversionError(
            f"format {fmt!r} is a compressedDepth stream (depth, with a private header), not a colour image")
    raw = bytes(msg.data) if not isinstance(msg.data, (bytes, bytearray)) else msg.data
    if not raw:
        raise ImageConversionError(f"compressed image (format {fmt!r}) has no data")
    size = _peek_size(raw)
    if size is not None:
        _check_size(size[0], size[1], max_pixels)
    try:
        # IGNORE_ORIENTATION: an EXIF rotation would break the pixel alignment with depth and camera_info
        bgr = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as exc:  # corrupt headers can raise instead of returning None
        raise ImageConversionError(f"could not decode {len(raw)} bytes of format {fmt!r}: {exc}") from None
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
        raise ImageConversionError(
            f"could not decode {len(raw)} bytes of format {fmt!r} (corrupt or not an image OpenCV reads)")
    _check_size(bgr.shape[1], bgr.shape[0], max_pixels)
    return np.ascontiguousarray(bgr[:, :, ::-1])


def rgb8_to_compressed(array_: np.ndarray, format: str = "jpeg", header: Header | None = None,
                       *, quality: int = 90) -> CompressedImage:
    """Encode (H, W, 3) RGB or (H, W) grey uint8 as a CompressedImage ('jpeg' or 'png').

    ``format`` follows image_transport's convention ("rgb8; jpeg compressed bgr8") so its subscribers decode it.
    """
    import cv2

    fmt = format.lower()
    if fmt in ("jpg", "jpeg"):
        ext, params = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    elif fmt == "png":
        ext, params = ".png", [cv2.IMWRITE_PNG_COMPRESSION, 3]
    else:
        raise ImageConversionError(f"unsupported compressed format {format!r}; use 'jpeg' or 'png'")
    arr = np.asarray(array_)
    if arr.dtype != np.uint8:
        raise ImageConversionError(f"expected uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 3:
        src, enc = np.ascontiguousarray(arr[:, :, ::-1]), "rgb8"
    elif arr.ndim == 2:
        src, enc = np.ascontiguousarray(arr), "mono8"
    else:
        raise ImageConversionError(f"expected an (H, W, 3) RGB or (H, W) grey array, got shape {arr.shape}")
    _check_size(arr.shape[1], arr.shape[0], None)
    ok, buf = cv2.imencode(ext, src, params)
    if not ok:
        raise ImageConversionError(f"OpenCV could not encode a {arr.shape} array as {fmt}")
    msg = CompressedImage()
    if header is not None:
        msg.header = header
    kind = "jpeg" if ext == ".jpg" else "png"
    msg.format = f"{enc}; {kind} compressed {'bgr8' if enc == 'rgb8' else 'mono8'}"
    msg.data = _as_bytes_array(buf)
    return msg


# ---------------------------------------------------------------------------------------------- depth

def depth_to_meters(msg: Image, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A depth image as float32 (H, W) metres, NaN where there is no measurement.

    The unit comes from the encoding (the anchors' "divisor parameter" confusion, ros_anchors.md §8):
    16UC1 / mono16 are millimetres, 32FC1 is metres. 0, NaN, ±inf and negative depths become NaN.
    """
    enc = msg.encoding
    if enc in ("16UC1", "mono16"):
        mm = image_to_numpy(msg, max_pixels=max_pixels)
        out = mm.astype(np.float32)
        out /= np.float32(1000.0)  # division, not *0.001: 1500 mm is exactly 1.5 m
        out[mm == 0] = np.nan
        return out
    if enc == "32FC1":
        out = image_to_numpy(msg, copy=True, max_pixels=max_pixels).astype(np.float32, copy=False)
        with np.errstate(invalid="ignore"):
            out[~(np.isfinite(out) & (out > 0))] = np.nan
        return out
    encoding_info(enc)  # unknown encodings get the "unknown" message
    raise ImageConversionError(f"depth encoding {enc!r} is not supported; use 16UC1 (millimetres) or 32FC1 (metres)")
