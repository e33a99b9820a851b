"""Decoding images from bytes, paths or s3:// URIs into RGB uint8 arrays, with clear errors."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .. import storage

Image.MAX_IMAGE_PIXELS = None  # size limits are enforced by the callers that need them


class ImageDecodeError(ValueError):
    """The bytes are not a readable image (corrupt, truncated, or not an image at all)."""


def decode_image(data: bytes, source: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 RGB; EXIF orientation applied."""
    if not data:
        raise ImageDecodeError(f"cannot decode {source}: the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = ImageOps.exif_transpose(img)
            array = np.array(img.convert("RGB"))
    except UnidentifiedImageError:
        raise ImageDecodeError(f"cannot decode {source}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"cannot decode {source}: {exc}") from None
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageDecodeError(f"cannot decode {source}: empty image")
    return np.ascontiguousarray(array)


def load_image(uri: str) -> np.ndarray:
    """Read and decode ``uri``; FileNotFoundError for a missing file, ImageDecodeError if unreadable."""
    return decode_image(storage.read_bytes(uri), source=str(uri))


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a (H, W) uint8/uint16 label map or (H, W, 3) uint8 image."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_label_png(data: bytes, source: str = "label map") -> np.ndarray:
    """A single-channel label map (uint8 or uint16) as stored, without palette conversion."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            array = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"cannot decode {source}: {exc}") from None
    if array.ndim != 2:
        raise ImageDecodeError(f"{source} must be a single-channel label map, got shape {array.shape}")
    return array
