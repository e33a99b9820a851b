"""The on-disk layout of a mining output, read by mining, training and the preview::

    OUT/pairs/shard-00000.parquet     PAIR_SCHEMA rows of the shard's images
    OUT/errors/shard-00000.parquet    ERROR_SCHEMA rows ("<reason code>: <detail>")
    OUT/shards/shard-00000.json       commit marker, written last, with the shard's counts
    OUT/parts/shard-00000/*.parquet   a shard's rows while it is mined (workers write them; removed
                                      once the shard is committed, ignored by everything else)
    OUT/manifest.json                 the settings that determine the output (its presence marks one)
    OUT/summary.json                  totals over all shards and the speed of the runs

A shard counts as done when its marker exists; each file is a single atomic write (rename locally,
one PUT on S3), so a crashed shard is redone under the same names and each pair is written once.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterable
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import ConfigError, settings_changes
from . import storage
from .coco import shard_name
from .pairs import ERROR_SCHEMA, PAIR_SCHEMA

logger = logging.getLogger(__name__)


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


MANIFEST_FILE = "manifest.json"  # the settings of a mining output; its presence marks one


class OutputLayout:
    """Paths of a mining output and the per-shard commit protocol."""

    def __init__(self, root: str):
        self.root = str(root).rstrip("/") if storage.is_remote(root) else str(root)

    @classmethod
    def find(cls, uri: str) -> OutputLayout | None:
        """The mining output ``uri`` is (its root) or whose pairs it holds (its ``pairs/`` folder), else None."""
        root = uri.rstrip("/")
        parent = root.rsplit("/", 1)[0] if storage.is_remote(root) else os.path.dirname(os.path.abspath(root))
        if storage.exists(storage.join(root, MANIFEST_FILE)):
            return cls(root)
        if root.rsplit("/", 1)[-1] == "pairs" and storage.exists(storage.join(parent, MANIFEST_FILE)):
            return cls(parent)
        return None

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def shard_file(self, kind: Literal["pairs", "errors"], index: int) -> str:
        return self.path(kind, f"{shard_name(index)}.parquet")

    def committed_files(self, kind: Literal["pairs", "errors"]) -> list[str]:
        """The ``kind`` files of the committed shards, in shard order (never a crashed shard's leftovers)."""
        return [self.shard_file(kind, index) for index in sorted(self.completed_shards())]

    def completed_shards(self) -> set[int]:
        fs, path = storage.filesystem(self.path("shards"))
        fs.invalidate_cache()
        if not fs.exists(path):
            return set()
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        return {int(n[len("shard-"):-len(".json")]) for n in names if n.startswith("shard-") and n.endswith(".json")}

    def read_markers(self) -> list[dict]:
        """The commit markers (shard counts) of every committed shard, fetched concurrently."""
        indices = sorted(self.completed_shards())
        if not indices:
            return []
        fs, _ = storage.filesystem(self.root)
        paths = [storage.filesystem(self.path("shards", f"{shard_name(i)}.json"))[1] for i in indices]
        found = fs.cat(paths)
        return [json.loads(found[path]) for path in paths]

    def write_shard(self, index: int, pairs: pa.Table, errors: pa.Table, counts: dict) -> None:
        """Errors, then pairs, then the marker: the shard is done only once all three exist."""
        storage.write_bytes(self.shard_file("errors", index), _parquet_bytes(errors))
        storage.write_bytes(self.shard_file("pairs", index), _parquet_bytes(pairs))
        storage.write_text(self.path("shards", f"{shard_name(index)}.json"), json.dumps(counts, sort_keys=True))

    def part_file(self, index: int, name: str) -> str:
        """A part of shard ``index`` written while it is mined (one per pipeline batch)."""
        return self.path("parts", shard_name(index), f"{name}.parquet")

    def write_part(self, index: int, name: str, table: pa.Table) -> str:
        uri = self.part_file(index, name)
        storage.write_bytes(uri, _parquet_bytes(table))
        return uri

    def read_parts(self, uris: Iterable[str]) -> list[pa.Table]:
        tables = []
        for uri in uris:
            fs, path = storage.filesystem(uri)
            with fs.open(path, "rb") as handle:
                tables.append(pq.read_table(handle))
        return tables

    def remove_parts(self, index: int) -> None:
        """Every part of shard ``index``: this run's, and those a crashed run left behind."""
        fs, path = storage.filesystem(self.path("parts", shard_name(index)))
        fs.invalidate_cache()
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def check_output(self) -> None:
        """Refuse an output that names an existing file (a folder or prefix is expected)."""
        fs, path = storage.filesystem(self.root)
        if fs.exists(path) and fs.isfile(path):
            raise ConfigError(f"output {self.root} is an existing file; give a folder (or s3:// prefix) for the "
                              f"mined pairs")

    def check_manifest(self, settings: dict[str, Any]) -> None:
        """Refuse to add to an output whose committed shards were mined with other settings.

        An output without any committed shard (a refused or crashed first run) takes new settings.
        Nothing is written here: :meth:`write_manifest` records the settings once the run can start.
        """
        uri = self.path(MANIFEST_FILE)
        if not storage.exists(uri):
            return
        previous = json.loads(storage.read_bytes(uri))
        changed = settings_changes(previous, settings)
        if changed and self.completed_shards():
            raise ConfigError(
                f"output {self.root} holds pairs mined with other settings ({'; '.join(changed)}); "
                f"use a new output folder or restore those settings to resume")

    def write_manifest(self, settings: dict[str, Any]) -> None:
        storage.write_text(self.path(MANIFEST_FILE), json.dumps(settings, indent=2, sort_keys=True))

    def read_table(self, kind: Literal["pairs", "errors"], shards: Iterable[int] | None = None,
                   columns: list[str] | None = None) -> pa.Table:
        """The rows of the given (default: all committed) shards, in shard order."""
        schema = PAIR_SCHEMA if kind == "pairs" else ERROR_SCHEMA
        indices = sorted(self.completed_shards() if shards is None else shards)
        tables = []
        for index in indices:
            fs, path = storage.filesystem(self.shard_file(kind, index))
            with fs.open(path, "rb") as handle:
                tables.append(pq.read_table(handle, columns=columns))
        if not tables:
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        return pa.concat_tables(tables)


def pair_files(uri: str) -> list[str]:
    """The Parquet files of pairs at ``uri``, for training, previews and exports alike. For a mining
    output (its root or its ``pairs/`` folder) only the committed shards' files: never its errors
    table nor a crashed shard's leftovers. Otherwise a folder's ``.parquet`` files, or the one file."""
    layout = OutputLayout.find(uri)
    if layout is not None:
        files = layout.committed_files("pairs")
        if not files:
            raise ValueError(f"the mining output {layout.root} has no finished shard yet")
        summary = layout.path("summary.json")
        if not (storage.exists(summary) and json.loads(storage.read_bytes(summary)).get("complete")):
            logger.warning("reading the %d finished shards of the unfinished mining run %s", len(files), layout.root)
        return files
    nested = storage.join(uri, "pairs")
    if storage.exists(nested):
        uri = nested
    fs, path = storage.filesystem(uri)
    with storage.remote_access(uri):
        if fs.isfile(path):
            return [uri]
    files = storage.list_files(uri, suffixes=[".parquet"])
    if not files:
        raise FileNotFoundError(f"no Parquet files of pairs under {uri}")
    return files
