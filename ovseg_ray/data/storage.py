"""Reading and writing local paths and ``s3://`` URIs through fsspec (s3fs for S3).

S3 credentials and endpoint come from the usual AWS settings (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for S3-compatible stores).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable

import fsspec


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of ``uri`` and the path within it."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def read_bytes(uri: str) -> bytes:
    """All bytes of ``uri``; a missing file raises FileNotFoundError naming it."""
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {uri}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"expected a file, found a directory: {uri}") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri``; local files are written to a temporary name then renamed."""
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_remote(uri):
        with fs.open(path, "wb") as handle:
            handle.write(data)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def remove_files(uris: list[str]) -> None:
    """Delete files (paths or URIs of one filesystem); S3 deletes them in batches."""
    if not uris:
        return
    fs, _ = filesystem(uris[0])
    fs.rm([filesystem(uri)[1] for uri in uris])


def list_files(prefix: str, suffixes: Iterable[str] | None = None) -> list[str]:
    """Every file under ``prefix`` (recursively), as full URIs, sorted; optionally by suffix."""
    fs, path = filesystem(prefix)
    if not fs.exists(path):
        raise FileNotFoundError(f"input not found: {prefix}")
    if fs.isfile(path):
        found = [path]
    else:
        found = [p for p in fs.find(path) if not p.endswith("/")]
    if suffixes is not None:
        wanted = tuple(s.lower() for s in suffixes)
        found = [p for p in found if p.lower().endswith(wanted)]
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if is_remote(prefix):
        return sorted(f"{protocol}://{p}" for p in found)
    return sorted(found)
