"""The OpenAPI description of ``POST /v1/segment``: request bodies as precise as the service's checks
(so that generated clients and the service agree) and the error responses."""

from __future__ import annotations

from typing import Any

from .api import ErrorResponse, SegmentRequest, SegmentResponse
from .config import Limits


def request_schemas(limits: Limits) -> dict[str, dict[str, Any]]:
    """OpenAPI schemas of both request bodies, saying what the service accepts: at least one and at
    most ``limits.max_classes`` names, each non-blank, at most ``limits.max_name_chars`` long and given
    once; exactly one image source (so that generated clients and the service agree)."""
    name = {"type": "string", "minLength": 1, "maxLength": limits.max_name_chars, "pattern": r"\S"}
    body = SegmentRequest.model_json_schema(by_alias=True)
    fields = body["properties"]
    fields["classes"].update({"items": name, "minItems": 1, "maxItems": limits.max_classes, "uniqueItems": True})
    for source in ("image_base64", "image_uri"):
        fields[source].pop("default", None)
    body["oneOf"] = [{"required": ["image_base64"]}, {"required": ["image_uri"]}]
    form = {
        "type": "object",
        "required": ["image", "classes"],
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "the image file (PNG, JPEG, WebP, ...)"},
            "classes": {"type": "string", "minLength": 1, "pattern": r"\S",
                        "description": "comma-separated names, a JSON list, or the field repeated"},
            "lambda": {"type": "number", "minimum": 0, "maximum": 1},
            "mask_threshold": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "outputs": {"type": "string", "description": "comma-separated: label_png, overlay_png, rle"},
            "mode": {"type": "string", "enum": ["eval", "demo"]},
        },
        "additionalProperties": False,
    }
    return {"multipart/form-data": form, "application/json": body}


def request_body(limits: Limits) -> dict[str, Any]:
    return {"required": True, "content": {kind: {"schema": schema} for kind, schema in request_schemas(limits).items()}}


def segment_docs(limits: Limits) -> dict[str, Any]:
    """Keyword arguments of the endpoint's FastAPI decorator: request body and responses."""
    return {
        "openapi_extra": {"requestBody": request_body(limits)},
        "responses": {
            200: {"model": SegmentResponse, "description": "the segmentation"},
            400: {"model": ErrorResponse, "description": "unreadable image or body"},
            403: {"model": ErrorResponse, "description": "image_uri outside the allowed prefixes"},
            413: {"model": ErrorResponse, "description": "body or image over the configured limits"},
            415: {"model": ErrorResponse, "description": "neither multipart/form-data nor JSON"},
            422: {"model": ErrorResponse, "description": "bad classes or parameters"},
            500: {"model": ErrorResponse, "description": "a failure of the service (a bug), counted in /v1/info"},
            503: {"model": ErrorResponse, "description": "overloaded: retry later"},
        },
    }


def describe_limits(app, limits: Limits) -> None:
    """Make ``app``'s OpenAPI document state this replica's own limits (most classes, longest name)."""
    app.openapi_schema = None
    app.openapi()["paths"]["/v1/segment"]["post"]["requestBody"] = request_body(limits)
