"""Image-text datasets stored as files (local or ``s3://``): Parquet tables and WebDataset tar shards.

Mining reads their rows with Ray Data's own readers; this module holds the plain-Python parts
around that, which never touch all images at once:

* :func:`input_files` lists the dataset's files (sorted) and :func:`group_files` cuts them into
  output shards of ``files_per_shard`` files, so an output shard follows its input files and a
  re-run needs the file listing only, never a listing of images.
* :func:`count_images` says how many images a file holds (a Parquet footer; a tar's headers,
  streamed), the number a shard must reach before it is committed. A file that is not a readable
  Parquet table or tar raises :class:`UnreadableInput` naming it.
* **Member URIs** name an image stored inside a container file, so that pairs point at something
  training and export can read back: ``TAR#MEMBER`` (``s3://b/00001.tar#000123.jpg``) and
  ``PARQUET#COLUMN[KEY_COLUMN=KEY]`` (``s3://b/part-0.parquet#jpg[key=000123]``).
  :func:`read_image_bytes` reads either, or a plain path/URI.
* :func:`image_id` turns a sample key into the int64 id of the pairs: the number itself for digit
  keys (img2dataset's ``000000123``), else a stable 63-bit hash of the key.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Sequence

from . import storage

PARQUET_SUFFIXES = (".parquet",)
TAR_SUFFIXES = (".tar",)
_TAR_MEMBER = re.compile(r"^(?P<container>.+?\.tar)#(?P<member>[^#]+)$")
_PARQUET_MEMBER = re.compile(r"^(?P<container>.+?\.parquet)#(?P<column>[^#\[\]]+)\[(?P<key_column>[^=\]]+)=(?P<key>.*)\]$")
# A WebDataset sample key: the member path up to the first dot of its base name (as Ray's reader groups them).
_SAMPLE_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class UnreadableInput(ValueError):
    """A dataset file (not one image in it) cannot be read: the message names it and why."""


def input_files(root: str, suffixes: Sequence[str]) -> list[str]:
    """The dataset's files under ``root`` (a file, folder or s3:// prefix) with these suffixes, sorted."""
    files = storage.list_files(root, suffixes=suffixes)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files under {root}")
    return files


def group_files(files: Sequence[str], files_per_shard: int) -> list[tuple[str, ...]]:
    """Consecutive groups of ``files_per_shard`` files: output shard ``i`` holds group ``i``."""
    if files_per_shard < 1:
        raise ValueError(f"files_per_shard must be at least 1, got {files_per_shard}")
    return [tuple(files[start:start + files_per_shard]) for start in range(0, len(files), files_per_shard)]


def sample_key(member: str) -> tuple[str | None, str | None]:
    """(key, extensions) of a tar member name, WebDataset's grouping rule; (None, None) without a dot."""
    match = _SAMPLE_KEY.match(member)
    return (match.group(1), match.group(2)) if match else (None, None)


def count_tar_samples(uri: str) -> int:
    """Samples (runs of members sharing a key) of a WebDataset tar, read as a stream without decoding."""
    fs, path = storage.filesystem(uri)
    count, previous = 0, None
    try:
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as stream:
            for info in stream:
                if not info.isreg():
                    continue
                key, _ = sample_key(info.name)
                if key is not None and key != previous:
                    count, previous = count + 1, key
    except FileNotFoundError:
        raise UnreadableInput(f"input file not found: {uri}") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UnreadableInput(f"input file {uri} is not a readable tar: {type(exc).__name__}: {exc}") from None
    return count


def count_parquet_rows(uri: str) -> int:
    """Rows of a Parquet file, from its footer."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    try:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    except FileNotFoundError:
        raise UnreadableInput(f"input file not found: {uri}") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
        raise UnreadableInput(f"input file {uri} is not a readable Parquet file: {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())}") from None


def count_images(uri: str) -> int:
    """Images a dataset file holds (one per Parquet row, one per WebDataset sample)."""
    return count_tar_samples(uri) if uri.lower().endswith(TAR_SUFFIXES) else count_parquet_rows(uri)


def image_id(key: str | int) -> int:
    """int64 id of a sample key: digit keys as numbers, others a stable 63-bit hash of the key."""
    if isinstance(key, int):
        return key
    text = str(key)
    if text.isdigit() and len(text) <= 18:
        return int(text)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def tar_member_uri(container: str, member: str) -> str:
    return f"{container}#{member}"


def parquet_member_uri(container: str, column: str, key_column: str, key: str) -> str:
    return f"{container}#{column}[{key_column}={key}]"


def is_member_uri(uri: str) -> bool:
    return bool(_TAR_MEMBER.match(uri) or _PARQUET_MEMBER.match(uri))


def read_image_bytes(uri: str) -> bytes:
    """The bytes of a plain path/URI or of a member URI; FileNotFoundError naming what is missing."""
    tar = _TAR_MEMBER.match(uri)
    if tar:
        return _read_tar_member(tar["container"], tar["member"])
    table = _PARQUET_MEMBER.match(uri)
    if table:
        return _read_parquet_cell(table["container"], table["column"], table["key_column"], table["key"])
    return storage.read_bytes(uri)


def _read_tar_member(container: str, member: str) -> bytes:
    fs, path = storage.filesystem(container)
    try:
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
            try:
                extracted = archive.extractfile(member)
            except KeyError:
                extracted = None
            if extracted is None:
                raise FileNotFoundError(f"file not found: {member} in {container}")
            return extracted.read()
    except FileNotFoundError as exc:
        if "file not found: " in str(exc):
            raise
        raise FileNotFoundError(f"file not found: {container}") from None


def _read_parquet_cell(container: str, column: str, key_column: str, key: str) -> bytes:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(container)
    try:
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=[key_column, column])
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {container}") from None
    for found, value in zip(table.column(key_column).to_pylist(), table.column(column).to_pylist()):
        if str(found) == key:
            return value
    raise FileNotFoundError(f"file not found: no row with {key_column}={key} in {container}")


def _coco_records(images: str, captions: str) -> list[tuple[int, str, list[str]]]:
    """(image id, image URI, captions in annotation order) of a COCO captions dataset, by id."""
    import json

    data = json.loads(storage.read_bytes(captions))
    texts: dict[int, list[str]] = {}
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        texts.setdefault(int(ann["image_id"]), []).append(str(ann.get("caption", "")))
    return [(int(im["id"]), storage.join(images, im["file_name"]), texts.get(int(im["id"]), []))
            for im in sorted(data["images"], key=lambda im: im["id"])]


def coco_to_webdataset(images: str, captions: str, out: str, images_per_file: int,
                       caption_member: str = "json") -> list[str]:
    """Write a COCO captions dataset as WebDataset tars (``{id:012d}.jpg`` + ``.json`` with the
    captions, or ``.txt`` with the first one); returns the tar URIs."""
    import io
    import json

    records = _coco_records(images, captions)
    written = []
    for number, start in enumerate(range(0, len(records), images_per_file)):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for image_id, uri, texts in records[start:start + images_per_file]:
                text = json.dumps({"caption": texts}) if caption_member == "json" else (texts or [""])[0]
                for suffix, data in (("jpg", storage.read_bytes(uri)), (caption_member, text.encode())):
                    info = tarfile.TarInfo(f"{image_id:012d}.{suffix}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        written.append(storage.join(out, f"{number:05d}.tar"))
        storage.write_bytes(written[-1], buffer.getvalue())
    return written


def coco_to_parquet(images: str, captions: str, out: str, images_per_file: int, image_bytes: bool) -> list[str]:
    """Write a COCO captions dataset as Parquet tables with columns ``key`` (``{id:012d}``), ``image``
    (the bytes, or the image's URI) and ``caption`` (the list of captions); returns the file URIs."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    records = _coco_records(images, captions)
    written = []
    for number, start in enumerate(range(0, len(records), images_per_file)):
        chunk = records[start:start + images_per_file]
        table = pa.table({
            "key": [f"{image_id:012d}" for image_id, _, _ in chunk],
            "image": [storage.read_bytes(uri) if image_bytes else uri for _, uri, _ in chunk],
            "caption": [texts for _, _, texts in chunk],
        })
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        written.append(storage.join(out, f"part-{number:05d}.parquet"))
        storage.write_bytes(written[-1], buffer.getvalue())
    return written
