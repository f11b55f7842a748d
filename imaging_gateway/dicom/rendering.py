"""Rendered and thumbnail images of one frame (PS3.18 10.4.1.1.3, 10.4.1.1.4, 8.3.5.1).

Pure and CPU-bound (callers run :func:`render` off the event loop): the frame's bytes
are decoded with pydicom, mapped for display (Modality LUT, VOI window, MONOCHROME1
inversion, palette colour) and written as JPEG or PNG with Pillow.
"""

from __future__ import annotations

import io
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut

from imaging_gateway.dicom.pixels import int_value
from imaging_gateway.dicom.transcode import single_frame_dataset
from imaging_gateway.errors import IntegrityError, InvalidRequest

__all__ = [
    "DEFAULT_JPEG_QUALITY",
    "MAX_VIEWPORT",
    "THUMBNAIL_VIEWPORT",
    "check_render_parameters",
    "render",
]

THUMBNAIL_VIEWPORT: Final = (128, 128)
DEFAULT_JPEG_QUALITY: Final = 90
MAX_VIEWPORT: Final = 65535
"""Largest viewport width or height: no image has more rows or columns (US, PS3.5 6.2)."""
_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})


def _first_number(value: Any) -> float | None:
    """The first of a possibly multi-valued number (WindowCenter may hold several)."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _window_linear(
    values: npt.NDArray[np.float64], center: float, width: float
) -> npt.NDArray[np.uint8]:
    """PS3.3 C.11.2.1.2.1 linear VOI function onto 0..255."""
    width = max(width, 1.0)
    scaled = (values - (center - 0.5)) / max(width - 1.0, 1e-9) + 0.5
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def _stretch(values: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    out: npt.NDArray[np.uint8] = np.rint((values - low) / (high - low) * 255.0).astype(np.uint8)
    return out


def _to_8bit(values: npt.NDArray[Any], bits: int) -> npt.NDArray[np.uint8]:
    if bits > 8:
        values = np.right_shift(values.astype(np.uint32), bits - 8)
    out: npt.NDArray[np.uint8] = np.clip(values, 0, 255).astype(np.uint8)
    return out


def _display(
    pixels: npt.NDArray[Any], ds: Dataset, window: tuple[float, float] | None
) -> npt.NDArray[np.uint8]:
    """8-bit grey or RGB for display: Modality LUT, VOI (window), MONOCHROME1 inversion."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor") or [0, 0, 16]
        return _to_8bit(rgb, int(descriptor[2]) if int(descriptor[2]) in (8, 16) else 16)
    if pixels.ndim == 3 or photometric not in _MONOCHROME:
        bits = int_value(ds, "BitsStored") or int_value(ds, "BitsAllocated") or 8
        return _to_8bit(pixels, bits)
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    if window is None:
        center = _first_number(ds.get("WindowCenter"))
        width = _first_number(ds.get("WindowWidth"))
        if center is not None and width is not None and width > 0:
            window = (center, width)
    if window is not None:
        out = _window_linear(values, window[0], window[1])
    elif "VOILUTSequence" in ds:
        out = _stretch(np.asarray(apply_voi_lut(values, ds), dtype=np.float64))
    else:
        out = _stretch(values)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def render(
    header: Dataset,
    frame: bytes,
    syntax: str,
    *,
    media_type: str,
    window: tuple[float, float] | None,
    quality: int,
    viewport: tuple[int, int] | None,
) -> bytes:
    """One frame (as stored in ``syntax``, with ``header``'s pixel module) as JPEG or PNG.

    Raises ``IntegrityError`` when the frame cannot be decoded.
    """
    ds = single_frame_dataset(header, frame, syntax)
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise IntegrityError(f"the frame cannot be decoded ({type(exc).__name__})") from None
    image = Image.fromarray(np.ascontiguousarray(_display(pixels, ds, window)))
    if viewport is not None:
        width, height = image.size
        # PS3.18 8.3.5.1.3 lets the server keep the aspect and size down; enlarging adds
        # no information and its cost grows with the viewport, not with the image.
        scale = min(viewport[0] / width, viewport[1] / height, 1.0)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if media_type == "image/png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def check_render_parameters(
    window: tuple[float, float] | None, quality: int | None, viewport: tuple[int, int] | None
) -> None:
    """``InvalidRequest`` for a window width <= 0, a quality outside 1-100 or a viewport
    side outside 1 to :data:`MAX_VIEWPORT`."""
    if window is not None and not window[1] > 0:
        raise InvalidRequest("the window width must be greater than 0")
    if quality is not None and not 1 <= quality <= 100:
        raise InvalidRequest("quality is 1 to 100")
    if viewport is not None and not all(1 <= v <= MAX_VIEWPORT for v in viewport):
        raise InvalidRequest(f"viewport: width and height are 1 to {MAX_VIEWPORT} pixels")
