"""Which ``image_uri`` a request may name: ``limits.image_uri_prefixes``, checked on the URI as the
storage client will resolve it.

A string comparison is not enough: ``http://host/public/../private/x.jpg`` starts with
``http://host/public/``, and the HTTP client then normalises the path and fetches
``/private/x.jpg``. So remote URIs with a dot segment (``.`` or ``..``, also percent-encoded, twice
encoded or behind a backslash) are refused outright, and the URI must lie under a prefix both as
written and percent-decoded, on ``/`` boundaries, with the scheme and host compared
case-insensitively. Local paths must resolve (``..`` and links followed) inside an allowed folder.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit

from ..data import storage

_SEPARATORS = re.compile(r"[/\\]")


def dot_segment(uri: str) -> bool:
    """Whether ``uri`` has a ``.`` or ``..`` segment, as written or after one or two percent-decodings."""
    once = unquote(uri)
    return any(part in (".", "..") for form in (uri, once, unquote(once)) for part in _SEPARATORS.split(form))


def _remote_parts(uri: str) -> tuple[str, str, str]:
    """(scheme, host, path) with scheme and host lower-cased; the path keeps its percent-encoding."""
    parts = urlsplit(uri)
    return parts.scheme.lower(), parts.netloc.lower(), parts.path


def _under(path: str, root: str) -> bool:
    """``path`` is ``root`` or lies below it, on a ``/`` boundary (an empty root admits everything)."""
    root = root.rstrip("/")
    return not root or path == root or path.startswith(root + "/")


def _remote_allowed(uri: str, prefix: str) -> bool:
    scheme, host, path = _remote_parts(uri)
    prefix_scheme, prefix_host, prefix_path = _remote_parts(prefix)
    if scheme != prefix_scheme:
        return False
    if not prefix_host:  # "s3://": every bucket of the scheme, when that is really meant
        return True
    return host == prefix_host and _under(path, prefix_path) and _under(unquote(path), unquote(prefix_path))


def _local_allowed(uri: str, prefixes: list[str]) -> bool:
    try:
        path = os.path.realpath(uri.removeprefix("file://"))
    except (ValueError, OSError):  # e.g. a NUL byte: no such file can be allowed
        return False
    for prefix in prefixes:
        if storage.is_remote(prefix):
            continue
        root = os.path.realpath(prefix.removeprefix("file://"))
        if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


def uri_refusal(uri: str, prefixes: list[str]) -> str | None:
    """Why ``uri`` may not be read (None when it may): remote URIs must lie under a remote prefix and
    have no dot segment; local paths must resolve inside an allowed directory."""
    allowed = ", ".join(prefixes) or "none: image URIs are disabled"
    if storage.is_remote(uri) and dot_segment(uri):
        return f"image_uri {uri!r} has a '.' or '..' path segment (perhaps percent-encoded), which is never allowed"
    if storage.is_remote(uri):
        inside = any(storage.is_remote(p) and _remote_allowed(uri, p) for p in prefixes)
    else:
        inside = _local_allowed(uri, prefixes)
    return None if inside else f"image_uri {uri!r} is not under an allowed prefix ({allowed})"


def uri_allowed(uri: str, prefixes: list[str]) -> bool:
    return uri_refusal(uri, prefixes) is None
