"""The HTTP API without Ray: request models, body parsing, input limits and the response body.

Every refusal is a :class:`RequestError` carrying the HTTP status and a message naming the problem:
400 unreadable input, 403 image URI outside the allowed prefixes, 413 too large, 415 unsupported
content type, 422 invalid parameters. Text that no response could carry (a lone surrogate, which
JSON's ``\\ud800`` escape can smuggle in) or no path may hold (NUL) is refused up front, naming the
field, and :func:`render_json` turns a body that still cannot be encoded into a JSON 500.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, Field, ValidationError

from ..data import storage
from ..config import StrictModel, format_validation_error
from ..data.images import ImageDecodeError, ImageTooLargeError, decode_image
from ..inference import SegmentationResult, vocabulary
from ..models.official import DEMO_MASK_THRESHOLD
from ..models.text import distinct_class_names
from ..outputs import class_rles, expand_labels, label_png, overlay_png, result_summary
from .config import Limits, OutputKind
from .multipart import FormPart, MultipartError, parse_multipart
from .stages import SegmentOutput
from .uris import uri_refusal

logger = logging.getLogger(__name__)


class RequestError(Exception):
    """A request the service refuses: HTTP ``status`` and a message for the client."""

    def __init__(self, status: int, message: str):
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # echoed input stays encodable
        super().__init__(message)
        self.status = status
        self.message = message


def _encodable(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return value


#: A text field of a request: any Unicode text without NUL (what a response, log line or path can carry).
Text = Annotated[str, AfterValidator(_encodable)]


class SegmentParams(StrictModel):
    classes: list[Text] = Field(description="class names to segment, e.g. ['sky', 'grass', 'red car']; "
                                            "each name once")
    lambda_: float | None = Field(
        None, alias="lambda", ge=0, le=1, description="CLIP weight in the ensemble (0 = MaskFormer only)"
    )
    mask_threshold: float | None = Field(None, gt=0, lt=1, description="proposal binarisation threshold")
    outputs: list[OutputKind] | None = Field(None, description="any of label_png, overlay_png, rle")
    mode: Literal["eval", "demo"] | None = Field(
        None, description="eval (default): the official evaluation inference; demo: the official demo's "
                          "(CLIP only, each class's best proposal, uncovered pixels unlabelled; no lambda)")


class SegmentRequest(SegmentParams):
    """JSON body of ``POST /v1/segment``: exactly one of ``image_base64`` and ``image_uri`` (a string,
    not null: the one not given is left out)."""

    image_base64: str = Field(None, description="the encoded image file (PNG, JPEG, ...) in base64")
    image_uri: Text = Field(None, description="s3:// URI (or a path) under an allowed prefix")


class ClassRLE(StrictModel):
    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="COCO compressed RLE (pycocotools' text form)")


class SegmentOutputs(StrictModel):
    label_png: str | None = Field(None, description="base64 PNG, class index per pixel (16-bit beyond 256)")
    overlay_png: str | None = Field(None, description="base64 PNG, the image with class colours and a legend")
    rle: dict[str, ClassRLE] | None = Field(None, description="COCO RLE of every class present")


class RegionBatchInfo(StrictModel):
    requests: int = Field(description="requests whose regions shared this request's CLIP forward")
    regions: int = Field(description="regions in that forward")


class SegmentResponse(StrictModel):
    """Body of a successful ``POST /v1/segment`` (documents :func:`response_body`)."""

    classes: list[str]
    height: int
    width: int
    pixel_fractions: dict[str, float]
    num_proposals: int
    num_valid_regions: int
    unlabelled_fraction: float = Field(description="share of pixels without a class (demo mode only)")
    lambda_: float = Field(alias="lambda")
    mask_threshold: float
    mode: Literal["eval", "demo"]
    outputs: SegmentOutputs
    timings: dict[str, float] = Field(description="seconds per stage: decode, proposals, text, regions, ...")
    region_batch: RegionBatchInfo


class ErrorResponse(StrictModel):
    detail: str = Field(description="what was wrong with the request")


@dataclass
class SegmentInput:
    """A validated request: image bytes or URI, cleaned class names, parameters."""

    classes: list[str]
    lam: float
    mask_threshold: float
    outputs: list[str]
    mode: str = "eval"
    image_bytes: bytes | None = None
    image_uri: str | None = None
    source: str = "image"


async def read_body(chunks: AsyncIterator[bytes], declared_length: str | None, limit: int) -> bytes:
    """The whole request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    if declared_length and declared_length.isdigit() and int(declared_length) > limit:
        raise RequestError(413, f"request body is {int(declared_length)} bytes; the limit is {limit} bytes")
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _text(part: FormPart) -> str:
    try:
        return part.data.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(400, f"form field {part.name!r} is not UTF-8 text") from None


def _names(values: list[str], field: str) -> list[str]:
    """Repeated fields are one name each; a single field is a JSON list or comma-separated names."""
    if len(values) != 1:
        return values
    value = values[0].strip()
    if value.startswith("["):
        try:
            parsed = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as exc:
            reason = str(exc) if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise RequestError(422, f"form field {field!r} starts with '[' but is not valid JSON: {reason}") from None
        if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
            raise RequestError(422, f"form field {field!r} must be a JSON list of strings")
        return parsed
    return value.split(",") if value else []


def form_fields(parts: list[FormPart]) -> tuple[FormPart, dict]:
    """The uploaded image part and the other fields as a :class:`SegmentParams` mapping."""
    allowed = {"image", "classes", "lambda", "mask_threshold", "outputs", "mode"}
    unknown = sorted({p.name for p in parts} - allowed)
    if unknown:
        raise RequestError(422, f"unknown form field(s) {', '.join(unknown)}; expected {', '.join(sorted(allowed))}")
    images = [p for p in parts if p.name == "image"]
    if len(images) != 1:
        raise RequestError(422, f"multipart request needs exactly one 'image' file field, got {len(images)}")
    values: dict[str, list[str]] = {}
    for part in parts:
        if part.name != "image":
            values.setdefault(part.name, []).append(_text(part))
    fields: dict = {}
    if "classes" in values:
        fields["classes"] = _names(values["classes"], "classes")
    if "outputs" in values:
        fields["outputs"] = [v.strip() for v in _names(values["outputs"], "outputs")]
    for name in ("lambda", "mask_threshold", "mode"):
        if name in values:
            if len(values[name]) != 1:
                raise RequestError(422, f"form field {name!r} given {len(values[name])} times")
            fields[name] = values[name][0].strip()
    return images[0], fields


# ----------------------------------------------------------------------------------------------
# validation


def check_classes(names: list[str], limits: Limits) -> list[str]:
    if len(names) > limits.max_classes:
        raise RequestError(422, f"too many classes: {len(names)} given, the limit is {limits.max_classes}")
    try:
        cleaned = distinct_class_names(names)
    except ValueError as exc:
        raise RequestError(422, str(exc)) from None
    for index, name in enumerate(cleaned):
        if len(name) > limits.max_name_chars:
            raise RequestError(
                422, f"class name #{index} is {len(name)} characters long (limit {limits.max_name_chars})"
            )
    return cleaned


def _validated(model: type[SegmentParams], data: dict) -> SegmentParams:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestError(422, format_validation_error(exc, "request")) from None


def _finish(params: SegmentParams, limits: Limits, defaults: dict, **image) -> SegmentInput:
    outputs = list(dict.fromkeys(params.outputs if params.outputs is not None else defaults["outputs"]))
    mode = params.mode or "eval"
    if mode == "demo":
        if params.lambda_ is not None:
            raise RequestError(422, "lambda does not apply in mode demo: the demo inference is CLIP only")
        lam, threshold = 1.0, DEMO_MASK_THRESHOLD
    else:
        lam, threshold = defaults["lambda"], defaults["mask_threshold"]
    classes = check_classes(params.classes, limits)
    if mode == "demo":  # a single name gets "others", as in the official demo
        classes = check_classes(vocabulary(classes, mode), limits)
    return SegmentInput(
        classes=classes,
        lam=lam if params.lambda_ is None else params.lambda_,
        mask_threshold=threshold if params.mask_threshold is None else params.mask_threshold,
        outputs=outputs,
        mode=mode,
        **image,
    )


def parse_segment_request(body: bytes, content_type: str, limits: Limits, defaults: dict) -> SegmentInput:
    """Validate a ``POST /v1/segment`` body; ``defaults`` has ``lambda``, ``mask_threshold``, ``outputs``."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        try:
            parts = parse_multipart(body, content_type)
        except MultipartError as exc:
            raise RequestError(exc.status, str(exc)) from None
        image, fields = form_fields(parts)
        params = _validated(SegmentParams, fields)
        return _finish(params, limits, defaults, image_bytes=image.data, source=image.filename or "uploaded image")
    if kind == "application/json":
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise RequestError(400, "request body is not valid JSON: nested too deeply") from None
        if not isinstance(data, dict):
            raise RequestError(422, "JSON request body must be an object")
        request = _validated(SegmentRequest, data)
        if (request.image_base64 is None) == (request.image_uri is None):
            raise RequestError(422, "give exactly one of image_base64 and image_uri")
        if request.image_uri is not None:
            return _finish(request, limits, defaults, image_uri=request.image_uri, source=request.image_uri)
        try:
            data = base64.b64decode(request.image_base64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(400, f"image_base64 is not valid base64: {exc}") from None
        return _finish(request, limits, defaults, image_bytes=data, source="image_base64")
    raise RequestError(
        415, f"unsupported content type {kind or '(none)'!r}: send multipart/form-data or application/json"
    )


def fetch_image_bytes(uri: str, limits: Limits) -> bytes:
    """The bytes behind ``uri`` if it is allowed and not larger than the request limit."""
    refusal = uri_refusal(uri, limits.image_uri_prefixes)
    if refusal:
        raise RequestError(403, refusal)
    try:
        fs, path = storage.filesystem(uri)
        size = fs.size(path)
        if size is not None and size > limits.max_request_bytes:
            raise RequestError(413, f"image {uri} is {size} bytes; the limit is {limits.max_request_bytes} bytes")
        return storage.read_bytes(uri)
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise RequestError(400, f"cannot read image_uri: {exc}") from None
    except PermissionError as exc:
        raise RequestError(400, f"cannot read image_uri {uri}: permission denied ({exc})") from None
    except OSError as exc:
        raise RequestError(400, f"cannot read image_uri {uri}: {exc}") from None
    except RequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. s3fs refusing a malformed bucket name: still the URI's fault
        logger.warning("reading %s failed: %r", uri, exc)
        raise RequestError(400, f"cannot read image_uri {uri}: {type(exc).__name__}: {exc}") from None


def decode_checked(data: bytes, source: str, max_pixels: int) -> np.ndarray:
    """Decode an image: 413 when its header announces more than ``max_pixels``, 400 when unreadable."""
    try:
        return decode_image(data, source, max_pixels=max_pixels)
    except ImageTooLargeError as exc:
        raise RequestError(413, str(exc)) from None
    except ImageDecodeError as exc:
        raise RequestError(400, str(exc)) from None


def load_request_image(request: SegmentInput, limits: Limits) -> np.ndarray:
    data = request.image_bytes
    if data is None:
        data = fetch_image_bytes(request.image_uri, limits)
    return decode_checked(data, request.source, limits.max_pixels)


def render_json(status: int, body: dict) -> tuple[int, bytes]:
    """``(status, bytes)`` of a JSON response. A body JSON cannot carry (text with a lone surrogate,
    NaN) becomes a JSON 500, so that it is answered and counted like any other failure."""
    try:
        return status, json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, TypeError) as exc:  # UnicodeEncodeError is a ValueError
        logger.error("cannot encode a %d response: %r", status, exc)
        detail = f"internal error: the response could not be encoded ({type(exc).__name__})"
        return 500, json.dumps({"detail": detail}).encode("utf-8")


# ----------------------------------------------------------------------------------------------
# response


def response_body(image: np.ndarray, request: SegmentInput, output: SegmentOutput, timings: dict) -> dict:
    """JSON body: classes, pixel fractions, requested outputs, timings per stage, region batch."""
    result = SegmentationResult(
        labels=expand_labels(output.labels, len(request.classes)),
        classes=request.classes,
        num_proposals=output.num_proposals,
        num_valid_regions=output.num_valid_regions,
    )
    body = result_summary(result, with_rle=False)
    outputs: dict = {}
    if "label_png" in request.outputs:
        outputs["label_png"] = base64.b64encode(label_png(result.labels, len(request.classes))).decode("ascii")
    if "overlay_png" in request.outputs:
        overlay = overlay_png(image, result.labels, request.classes)
        outputs["overlay_png"] = base64.b64encode(overlay).decode("ascii")
    if "rle" in request.outputs:
        outputs["rle"] = class_rles(result.labels, request.classes)
    body["lambda"] = request.lam
    body["mask_threshold"] = request.mask_threshold
    body["mode"] = request.mode
    body["outputs"] = outputs
    body["timings"] = {k: round(v, 6) for k, v in {**output.timings, **timings}.items()}
    body["region_batch"] = {"requests": output.region_batch_requests, "regions": output.region_batch_regions}
    return body
