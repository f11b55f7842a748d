"""Transfer syntax conversion of whole instances and single frames (PS3.5 8, A; PS3.18 8.7.3).

Pure and CPU-bound: callers run these functions off the event loop. Decoding uses
pydicom's pixel decoders with the plugins installed beside it (pylibjpeg-libjpeg: JPEG
baseline, extended, lossless and JPEG-LS; pylibjpeg-openjpeg: JPEG 2000 and HTJ2K;
pydicom itself: RLE). Encoding produces uncompressed Explicit and Implicit VR Little
Endian, RLE Lossless (pydicom) and JPEG 2000 Lossless (pylibjpeg-openjpeg). Nothing is
compressed lossily: JPEG 2000 (1.2.840.10008.1.2.4.91) and the other lossy syntaxes are
only ever sent as stored (PS3.18 8.7.3.5: a lossy representation only when the client
asks for it; PS3.3 C.7.6.1.1.5 would also make it a new SOP Instance). An image that was
lossy compressed keeps (or gains) LossyImageCompression "01" when it is decompressed.
The SOP Instance UID is never changed: a lossless change of transfer syntax is the same
instance (PS3.5 10.1).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any, Final

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import UID

from imaging_gateway.dicom.deflate import InflateLimitExceeded, read_part10
from imaging_gateway.errors import IntegrityError, NotAcceptable

__all__ = [
    "ENCODABLE",
    "LOSSY",
    "can_decode",
    "can_encode",
    "convert_frame",
    "decode_frame",
    "encode_frame",
    "frame_why_not",
    "native_pixel_bytes",
    "single_frame_dataset",
    "transcode_instance",
    "why_not",
]

IMPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1"
DEFLATED: Final = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN: Final = "1.2.840.10008.1.2.2"
RLE_LOSSLESS: Final = "1.2.840.10008.1.2.5"
JPEG_2000_LOSSLESS: Final = "1.2.840.10008.1.2.4.90"

_NATIVE: Final = frozenset({IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, DEFLATED})
ENCODABLE: Final = (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    RLE_LOSSLESS,
    JPEG_2000_LOSSLESS,
)
"""Syntaxes this module can produce (if their encoder is installed), in server preference."""
_COMPRESSING: Final = frozenset({RLE_LOSSLESS, JPEG_2000_LOSSLESS})
LOSSY: Final = frozenset(
    {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.93",
        "1.2.840.10008.1.2.4.110",
        "1.2.840.10008.1.2.4.112",
        "1.2.840.10008.1.2.4.203",
        *(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)),
    }
)
"""Syntaxes whose pixel data may have been compressed lossily (PS3.5 Table A-1, 8.2)."""
_PIXEL_KEYWORDS: Final = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _syntax(ts: str | None) -> str:
    return ts or IMPLICIT_VR_LITTLE_ENDIAN


def can_decode(ts: str | None) -> bool:
    """Whether pixel data stored in ``ts`` can be decoded here. Raises nothing."""
    syntax = _syntax(ts)
    if syntax in _NATIVE or syntax == EXPLICIT_VR_BIG_ENDIAN:
        return True
    try:
        return bool(get_decoder(UID(syntax)).is_available)
    except (NotImplementedError, ValueError):
        return False


def can_encode(ts: str) -> bool:
    """Whether this module produces ``ts`` (and its encoder is installed). Raises nothing."""
    if ts in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN):
        return True
    if ts not in _COMPRESSING:
        return False
    try:
        return bool(get_encoder(UID(ts)).is_available)
    except (NotImplementedError, ValueError):
        return False


def _name(ts: str) -> str:
    name = UID(ts).name
    return f"{name} ({ts})" if name and name != ts else ts


def why_not(source: str | None, target: str) -> str | None:
    """Why an instance stored in ``source`` cannot be sent in ``target``; None if it can.

    ``target == source`` is always possible (as stored). Raises nothing.
    """
    syntax = _syntax(source)
    if target == syntax:
        return None
    if target in LOSSY:
        return f"{_name(target)} is lossy; this gateway does not compress lossily"
    if not can_encode(target):
        return f"no encoder for {_name(target)} is installed on this gateway"
    if syntax == EXPLICIT_VR_BIG_ENDIAN:
        return "Explicit VR Big Endian (retired) instances are sent only as stored"
    if not can_decode(syntax):
        return f"no decoder for {_name(syntax)} is installed on this gateway"
    return None


def frame_why_not(source: str | None, target: str) -> str | None:
    """Like :func:`why_not` for one frame: big-endian frames can be decoded. Raises nothing."""
    syntax = _syntax(source)
    if syntax == EXPLICIT_VR_BIG_ENDIAN and target == EXPLICIT_VR_LITTLE_ENDIAN:
        return None
    if syntax == EXPLICIT_VR_BIG_ENDIAN and can_encode(target) and target not in LOSSY:
        return None
    return why_not(syntax, target)


def convert_frame(
    header: Dataset, frame: bytes, syntax: str, target: str, *, max_bytes: int
) -> bytes:
    """One frame stored in ``syntax`` as ``target`` (uncompressed Explicit VR LE, RLE, J2K).

    Raises what :func:`decode_frame` and :func:`encode_frame` raise.
    """
    if target == EXPLICIT_VR_LITTLE_ENDIAN:
        return decode_frame(header, frame, syntax, max_bytes=max_bytes)
    return encode_frame(header, frame, syntax, target, max_bytes=max_bytes)


def _native_length(ds: Dataset) -> int:
    """Bytes of the decoded pixel data (every frame), from the Image Pixel module."""

    def number(keyword: str, default: int) -> int:
        try:
            value = ds.get(keyword)
            return default if value in (None, "") else int(value)
        except (TypeError, ValueError):
            return default

    rows, columns = number("Rows", 0), number("Columns", 0)
    samples = max(number("SamplesPerPixel", 1), 1)
    frames = max(number("NumberOfFrames", 1), 1)
    bits = number("BitsAllocated", 16)
    return rows * columns * samples * frames * max(bits, 8) // 8


def _check_size(ds: Dataset, stored: int, max_bytes: int) -> None:
    need = stored + _native_length(ds)
    if need > max_bytes:
        raise NotAcceptable(
            f"transcoding this instance needs about {need} bytes in memory, more than the "
            f"configured maximum ({max_bytes}); ask for transfer-syntax=* to get it as stored"
        )


def _mark_lossy(ds: Dataset, source: str) -> None:
    # PS3.3 C.7.6.1.1.5: once lossy compressed, an image says so in every later form.
    if source in LOSSY and str(ds.get("LossyImageCompression", "")).strip() != "01":
        ds.LossyImageCompression = "01"


def _codec_error(what: str, target: str, exc: Exception) -> NotAcceptable:
    return NotAcceptable(f"the {what} cannot be encoded in {_name(target)} ({type(exc).__name__})")


def transcode_instance(
    data: bytes, target: str, *, max_bytes: int, max_inflated: int | None = None
) -> bytes:
    """The Part 10 object ``data`` re-encoded in transfer syntax ``target``.

    Decodes compressed pixel data (all frames at once: the whole instance is in memory,
    bounded by ``max_bytes`` for the stored bytes plus the decoded pixel data, and a
    deflated dataset inflated at most ``max_inflated``, default ``max_bytes``), then
    writes the dataset in ``target``, compressing the pixel data for RLE or JPEG 2000
    Lossless. Other elements, the SOP Instance UID included, are kept.

    Raises ``NotAcceptable`` (no decoder or encoder, the image's parameters are not
    encodable in ``target``, larger than ``max_bytes``) and ``IntegrityError`` (the
    object or its pixel data cannot be read).
    """
    try:
        # A deflated dataset is decoded bytes in memory too: bounded before it is whole.
        limit = max_bytes if max_inflated is None else min(max_bytes, max_inflated)
        ds = read_part10(data, max_inflated=limit)
        source = str(ds.file_meta.get("TransferSyntaxUID", "") or IMPLICIT_VR_LITTLE_ENDIAN)
    except InflateLimitExceeded:
        raise NotAcceptable(
            f"transcoding this instance needs more than the configured maximum ({limit}) "
            "in memory (its deflated dataset inflates past it); ask for transfer-syntax=* to "
            "get it as stored"
        ) from None
    except Exception as exc:
        raise IntegrityError(f"the instance cannot be read ({type(exc).__name__})") from None
    reason = why_not(source, target)
    if reason is not None:
        raise NotAcceptable(f"the instance cannot be sent in {_name(target)}: {reason}")
    has_pixels = any(keyword in ds for keyword in _PIXEL_KEYWORDS)
    if has_pixels:
        _check_size(ds, len(data), max_bytes)
    if "PixelData" in ds and UID(source).is_compressed:
        try:
            ds.decompress(generate_instance_uid=False)
        except Exception as exc:
            raise IntegrityError(
                f"the pixel data cannot be decoded ({type(exc).__name__})"
            ) from None
        _mark_lossy(ds, source)
    # Elements after the pixel data (trailing padding) stay as read.
    ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)
    if target in _COMPRESSING and "PixelData" in ds:
        try:
            ds.compress(target, generate_instance_uid=False)
        except Exception as exc:
            raise _codec_error("pixel data", target, exc) from None
    ds.file_meta.TransferSyntaxUID = UID(target)
    buffer = io.BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
    except Exception as exc:
        raise IntegrityError(
            f"the instance cannot be written in {_name(target)} ({type(exc).__name__})"
        ) from None
    return buffer.getvalue()


def single_frame_dataset(header: Dataset, frame: bytes, syntax: str) -> Dataset:
    """A copy of ``header`` holding just this frame, for pydicom's decoders and encoders."""
    ds = copy.deepcopy(header)
    for tag in (0x7FE00001, 0x7FE00002):  # Extended Offset Table (and Lengths)
        if tag in ds:
            del ds[tag]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    if "NumberOfFrames" in ds:
        ds.NumberOfFrames = 1
    if UID(syntax).is_encapsulated:
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = frame
        bits = ds.get("BitsAllocated") or 8
        ds["PixelData"].VR = "OW" if int(bits) > 8 else "OB"
    return ds


def native_pixel_bytes(array: np.ndarray[Any, Any]) -> bytes:
    """A decoded pixel array as uncompressed little-endian bytes (PS3.5 8.1.1)."""
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return bytes(np.ascontiguousarray(little).tobytes())


def decode_frame(header: Dataset, frame: bytes, syntax: str, *, max_bytes: int) -> bytes:
    """One frame stored in ``syntax`` as uncompressed Explicit VR Little Endian bytes.

    Colour JPEG frames in YBR come out as RGB (pydicom's default, as for decompressed
    instances). Raises ``NotAcceptable`` (no decoder, frame larger than ``max_bytes``) and
    ``IntegrityError`` (undecodable).
    """
    if not can_decode(syntax):
        raise NotAcceptable(f"no decoder for {_name(syntax)} is installed on this gateway")
    ds = single_frame_dataset(header, frame, syntax)
    _check_size(ds, len(frame), max_bytes)
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise IntegrityError(f"the frame cannot be decoded ({type(exc).__name__})") from None
    if int(ds.get("BitsAllocated") or 8) == 1:
        raise NotAcceptable("bit-packed frames are sent only as stored")
    return native_pixel_bytes(pixels)


def encode_frame(
    header: Dataset, frame: bytes, syntax: str, target: str, *, max_bytes: int
) -> bytes:
    """One frame stored in ``syntax``, compressed as one ``target`` frame (RLE, J2K lossless).

    Raises ``NotAcceptable`` (no codec, parameters not encodable, too large) and
    ``IntegrityError`` (undecodable).
    """
    reason = frame_why_not(syntax, target)
    if reason is not None:
        raise NotAcceptable(f"the frame cannot be sent in {_name(target)}: {reason}")
    native = frame
    if UID(syntax).is_compressed or syntax == EXPLICIT_VR_BIG_ENDIAN:
        native = decode_frame(header, frame, syntax, max_bytes=max_bytes)
    ds = single_frame_dataset(header, native, EXPLICIT_VR_LITTLE_ENDIAN)
    if UID(syntax).is_compressed:
        # Decoding may have changed the photometric interpretation (YBR -> RGB).
        ds.PhotometricInterpretation = _decoded_photometric(header, syntax)
        if int(ds.get("SamplesPerPixel") or 1) > 1:
            ds.PlanarConfiguration = 0  # decoded arrays are colour-by-pixel
    _check_size(ds, len(frame), max_bytes)
    try:
        ds.compress(target, generate_instance_uid=False)
        return bytes(get_frame(ds.PixelData, 0, number_of_frames=1))
    except Exception as exc:
        raise _codec_error("frame", target, exc) from None


def _decoded_photometric(header: Dataset, syntax: str) -> str:
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric.startswith("YBR") and int(header.get("SamplesPerPixel") or 1) == 3:
        # pydicom converts YBR to RGB when decoding (as_rgb); JPEG 2000's YBR_ICT/RCT too.
        return "RGB"
    return photometric


ProducibleCheck = Callable[[str | None, str], str | None]
"""Signature of :func:`why_not`, for negotiation."""
