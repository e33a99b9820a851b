"""Reading and writing local paths and ``s3://`` URIs through fsspec (s3fs for S3).

S3 credentials and endpoint come from the usual AWS settings (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for S3-compatible stores, or the machine's instance
role). A store that cannot be reached, or no credentials at all, is one
:class:`StorageUnreachableError` naming the URI, the endpoint and the cause (not a botocore
traceback): the functions here raise it themselves, and :func:`unreachable_error` recognises the
same failures raised anywhere else (the command line uses it for its last word).
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import fsspec

# Failures of reaching the store at all (botocore, aiobotocore, aiohttp), named so that botocore
# need not be imported to recognise them.
_CONNECTION_FAILURES = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                        "ProxyConnectionError", "ClientConnectorError", "ServerTimeoutError", "ConnectionRefusedError"}
_CREDENTIAL_FAILURES = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}


class StorageUnreachableError(ConnectionError):
    """A remote store could not be reached, or there are no credentials for it: URI, endpoint, cause."""


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of ``uri`` and the path within it."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (``__cause__``, ``__context__``, a Ray task error's ``cause``)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        wrapped = getattr(exc, "cause", None)
        exc = wrapped if isinstance(wrapped, BaseException) else exc.__cause__ or exc.__context__


def endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS's default S3 endpoint"


def unreachable_error(exc: BaseException, uri: str | None = None) -> StorageUnreachableError | None:
    """The one-line error for ``exc`` if it (or what it wraps) is a failure to reach a remote store or
    to find credentials for it; None otherwise. ``uri`` defaults to the one in the failed request."""
    for cause in _causes(exc):
        if isinstance(cause, StorageUnreachableError):
            return cause
        kinds = {kind.__name__ for kind in type(cause).__mro__}
        if kinds & _CREDENTIAL_FAILURES:
            reason = (f"no credentials found ({type(cause).__name__}: {cause}); set AWS_ACCESS_KEY_ID and "
                      f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or give the machine an instance role")
        elif kinds & _CONNECTION_FAILURES:
            reason = f"cannot connect ({type(cause).__name__}: {cause})"
        else:
            continue
        if uri is None:  # e.g. "Could not connect to the endpoint URL: "http://host:9000/bucket/key""
            found = re.search(r'https?://[^/\s"]+/([^?\s"]+)', str(cause))
            uri = f"s3://{found.group(1)}" if found else "S3"
        return StorageUnreachableError(f"cannot reach {uri} (endpoint {endpoint()}): {reason}")
    return None


@contextmanager
def remote_access(uri: str) -> Iterator[None]:
    """Turn a failure to reach ``uri``'s store into :class:`StorageUnreachableError`; others pass."""
    try:
        yield
    except Exception as exc:
        error = unreachable_error(exc, uri) if is_remote(uri) else None
        if error is None or error is exc:
            raise
        raise error from None


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def read_bytes(uri: str) -> bytes:
    """All bytes of ``uri``; a missing file raises FileNotFoundError naming it."""
    fs, path = filesystem(uri)
    try:
        with remote_access(uri), fs.open(path, "rb") as handle:
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
        with remote_access(uri):
            fs.makedirs(parent, exist_ok=True)
    if is_remote(uri):
        with remote_access(uri), fs.open(path, "wb") as handle:
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
    with remote_access(uri):
        return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    with remote_access(uri):
        fs.makedirs(path, exist_ok=True)


def check_output_folder(uri: str, what: str = "--out") -> None:
    """Refuse, before any work, an output folder that is an existing local file."""
    local = None if is_remote(uri) else str(uri).removeprefix("file://")
    if local is not None and os.path.isfile(local):
        raise NotADirectoryError(f"{what} {uri} is an existing file, not a folder: give a folder (it is created "
                                 f"if missing)")


def upload_folder(local: str, uri: str) -> list[str]:
    """Copy every file under the local folder ``local`` to the same relative path under ``uri``."""
    written = []
    for root, _, files in os.walk(local):
        for name in sorted(files):
            source = os.path.join(root, name)
            target = join(uri, os.path.relpath(source, local).replace(os.sep, "/"))
            fs, path = filesystem(target)
            with remote_access(target):
                fs.put_file(source, path)
            written.append(target)
    return written


def remove_files(uris: list[str]) -> None:
    """Delete files (paths or URIs of one filesystem); S3 deletes them in batches."""
    if not uris:
        return
    fs, _ = filesystem(uris[0])
    with remote_access(uris[0]):
        fs.rm([filesystem(uri)[1] for uri in uris])


def list_files(prefix: str, suffixes: Iterable[str] | None = None) -> list[str]:
    """Every file under ``prefix`` (recursively), as full URIs, sorted; optionally by suffix."""
    fs, path = filesystem(prefix)
    with remote_access(prefix):
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
