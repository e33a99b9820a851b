"""A strict ``multipart/form-data`` body parser (RFC 7578): part contents come back byte for byte.

Used instead of python-multipart so that the service needs no extra dependency; the whole body is
already in memory (its size is capped before parsing).
"""

from __future__ import annotations

import email.message
import email.utils
from dataclasses import dataclass

MAX_FORM_PARTS = 4096


class MultipartError(ValueError):
    """A malformed body; ``status`` is 400, or 413 for too many parts."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class FormPart:
    name: str
    data: bytes
    filename: str | None = None


def _header_params(header: str, value: str) -> email.message.Message:
    message = email.message.Message()
    message[header] = value
    return message


def _param(message: email.message.Message, name: str, header: str) -> str | None:
    value = message.get_param(name, header=header)
    if value is None:
        return None
    return email.utils.collapse_rfc2231_value(value)


def parse_multipart(body: bytes, content_type: str) -> list[FormPart]:
    """The parts of a ``multipart/form-data`` body (RFC 7578), contents byte for byte."""
    boundary = _param(_header_params("content-type", content_type), "boundary", "content-type")
    if not boundary:
        raise MultipartError("multipart/form-data content type without a boundary parameter")
    delimiter = b"--" + boundary.encode("latin-1")
    first = body.find(delimiter)
    if first < 0 or (first > 0 and body[first - 2 : first] != b"\r\n"):
        raise MultipartError("malformed multipart body: the boundary never starts a line")
    parts: list[FormPart] = []
    position = first + len(delimiter)
    while not body.startswith(b"--", position):
        if not body.startswith(b"\r\n", position):
            raise MultipartError("malformed multipart body: text after a boundary")
        position += 2
        end = body.find(b"\r\n" + delimiter, position)
        if end < 0:
            raise MultipartError("malformed multipart body: no closing boundary (truncated upload?)")
        raw = body[position:end]
        if raw.startswith(b"\r\n"):
            head, data = b"", raw[2:]
        else:
            split = raw.find(b"\r\n\r\n")
            if split < 0:
                raise MultipartError("malformed multipart body: a part has no blank line after its headers")
            head, data = raw[:split], raw[split + 4 :]
        headers = email.message_from_bytes(head + b"\r\n\r\n")
        name = _param(headers, "name", "content-disposition")
        if not name:
            raise MultipartError("malformed multipart body: a part has no form field name")
        parts.append(FormPart(name, data, _param(headers, "filename", "content-disposition")))
        if len(parts) > MAX_FORM_PARTS:
            raise MultipartError(f"multipart body has more than {MAX_FORM_PARTS} parts", 413)
        position = end + 2 + len(delimiter)
    return parts
