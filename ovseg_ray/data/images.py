"""Decoding images from bytes, paths or s3:// URIs into RGB uint8 arrays, with clear errors."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


Image.MAX_IMAGE_PIXELS = None  # the size limit is checked here, on the header, with a clear message

DEFAULT_MAX_IMAGE_PIXELS = 200_000_000  # 200 megapixels: 600 MB decoded


class ImageDecodeError(ValueError):
    """The bytes are not a readable image (corrupt, truncated, too large, or not an image at all)."""


class ImageTooLargeError(ImageDecodeError):
    """The image header announces more pixels than allowed (checked before decoding)."""


def _decode_failure(source: str, exc: BaseException) -> ImageDecodeError:
    if isinstance(exc, UnidentifiedImageError):
        return ImageDecodeError(f"cannot decode {source}: not a recognised image format")
    if isinstance(exc, MemoryError):
        return ImageDecodeError(f"cannot decode {source}: not enough memory (damaged header?)")
    return ImageDecodeError(f"cannot decode {source}: {type(exc).__name__}: {exc}")


def decode_image(data: bytes, source: str = "image", max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 RGB; EXIF orientation applied.

    Any failure of the decoder (Pillow raises many kinds on damaged files) becomes ImageDecodeError
    naming ``source``; an image over ``max_pixels`` is refused from its header, before decoding.
    """
    if not data:
        raise ImageDecodeError(f"cannot decode {source}: the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(
                    f"image {source} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
                )
            img = ImageOps.exif_transpose(img)
            array = np.array(img.convert("RGB"))
    except ImageDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - every decoder failure is the file's fault, named below
        raise _decode_failure(source, exc) from None
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageDecodeError(f"cannot decode {source}: empty image")
    return np.ascontiguousarray(array)


def load_image(uri: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read and decode ``uri`` (also an image inside a tar or Parquet file: see ``image_text``);
    FileNotFoundError for a missing file, ImageDecodeError if unreadable."""
    from .image_text import read_image_bytes

    return decode_image(read_image_bytes(str(uri)), source=str(uri), max_pixels=max_pixels)


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
    except Exception as exc:  # noqa: BLE001 - as in decode_image
        raise _decode_failure(source, exc) from None
    if array.ndim != 2:
        raise ImageDecodeError(f"{source} must be a single-channel label map, got shape {array.shape}")
    return array
