"""What mining reads (plain Python, no Ray): the plan of output shards of each input format, and the
conversion of the rows Ray Data's readers give into the pipeline's items.

* **coco**: the captions JSON is read on the driver (it is one file); shards are runs of
  ``shard_size`` image ids, their sizes known up front.
* **parquet** / **webdataset**: only the file listing is read on the driver; shard ``i`` is the
  ``i``-th group of ``files_per_shard`` files (sorted), so resume needs no listing of images. A
  shard's size (its images) is counted by a worker (:func:`ovseg_ray.data.image_text.count_images`).

Every item has the same schema (:data:`ITEM_SCHEMA`): the image's shard, id, URI, captions, and
its bytes when the input holds them (Parquet bytes, WebDataset) so they are never read twice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ..config import ConfigError
from ..data import image_text, storage
from ..data.coco import CocoCaptions
from .config import MiningConfig

ITEM_SCHEMA = pa.schema([
    ("shard", pa.int64()), ("image_id", pa.int64()), ("image_uri", pa.string()),
    ("captions", pa.list_(pa.string())),
    ("image_bytes", pa.large_binary()),  # the encoded image when the input holds it, else b"" (read image_uri)
    ("input_error", pa.string()),  # "<reason code>: <detail>" when the input row itself is unusable
])


@dataclass(frozen=True)
class ShardPlan:
    index: int
    expected: int | None  # images in the shard; None until a worker has counted them (file formats)
    files: tuple[str, ...] = ()  # file formats: the input files of the shard
    image_ids: tuple[int, ...] = ()  # coco: the shard's image ids

    def marker(self) -> dict[str, Any]:
        """What the commit marker records about the shard's input."""
        if self.files:
            return {"files": list(self.files)}
        return {"first_image_id": self.image_ids[0], "last_image_id": self.image_ids[-1]}


@dataclass
class InputPlan:
    shards: list[ShardPlan]
    fingerprint: str  # a re-run must see the same input
    size: int  # images (coco) or files (the file formats)
    images: int | None  # images in the input when known up front (coco)
    coco: CocoCaptions | None = field(default=None, repr=False)


def strip_scheme(uri: str) -> str:
    """A URI as Ray Data's ``include_paths`` column gives it: ``bucket/key`` for s3://, paths as they are."""
    return uri.split("://", 1)[1] if storage.is_remote(uri) else uri


def plan_input(config: MiningConfig) -> InputPlan:
    """The output shards of the configured input, and its fingerprint."""
    if config.format == "coco":
        dataset = CocoCaptions(config.images, config.captions, config.captions_per_image, config.max_images)
        if len(dataset) == 0:
            raise ValueError(f"captions file {config.captions} lists no images")
        shards = [ShardPlan(s.index, len(s.images), image_ids=tuple(s.image_ids))
                  for s in dataset.shards(config.shard_size)]
        return InputPlan(shards, dataset.fingerprint(), len(dataset), len(dataset), dataset)
    suffixes = image_text.PARQUET_SUFFIXES if config.format == "parquet" else image_text.TAR_SUFFIXES
    files = image_text.input_files(config.data, suffixes)[:config.max_files]
    if config.format == "parquet":
        check_parquet_columns(config, files[0])
    digest = hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]
    shards = [ShardPlan(index, None, files=group)
              for index, group in enumerate(image_text.group_files(files, config.files_per_shard))]
    return InputPlan(shards, digest, len(files), None)


def check_parquet_columns(config: MiningConfig, first_file: str) -> None:
    """The configured columns exist in the first file (its footer), with usable types."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(first_file)
    with fs.open(path, "rb") as handle:
        schema = pq.ParquetFile(handle).schema_arrow
    columns = config.columns
    wanted = {"columns.image": columns.image, "columns.caption": columns.caption, "columns.key": columns.key}
    missing = [f"{name}={value!r}" for name, value in wanted.items() if value and value not in schema.names]
    if missing:
        raise ConfigError(f"{first_file} has no column {', '.join(missing)} (its columns: {', '.join(schema.names)})")
    image_type = schema.field(columns.image).type
    if (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)) and not columns.key:
        raise ConfigError(f"columns.image={columns.image!r} holds image bytes: set columns.key to the column that "
                          f"identifies a row, so that the pairs can point at their image")


def coco_items(plan: InputPlan, todo: list[ShardPlan], shard_size: int) -> list[dict]:
    """The items of the COCO shards still to do (the captions JSON is on the driver already)."""
    wanted = {shard.index for shard in todo}
    return [{"shard": shard.index, "image_id": image.image_id, "image_uri": image.uri,
             "captions": list(image.captions), "image_bytes": b"", "input_error": ""}
            for shard in plan.coco.shards(shard_size) if shard.index in wanted for image in shard.images]


def _captions(value: Any, captions_per_image: int) -> list[str]:
    """Non-empty, stripped captions (a string or a list of them), at most ``captions_per_image``."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [t for t in (str(v).strip() for v in values if v is not None) if t][:captions_per_image]


def parquet_items(batch: pa.Table, shard_of: dict[str, tuple[int, str]], image_column: str,
                  caption_column: str, key_column: str | None, images_root: str | None,
                  captions_per_image: int) -> pa.Table:
    """Ray Data task: rows of ``read_parquet(..., include_paths=True)`` -> items."""
    out = []
    for row in batch.to_pylist():
        shard, container = shard_of[row["path"]]
        value = row[image_column]
        key = None if key_column is None else row[key_column]
        if isinstance(value, (bytes, bytearray)):
            uri = image_text.parquet_member_uri(container, image_column, key_column, str(key))
            data, error = bytes(value), "" if value else f"missing image: empty {image_column} in row {key}"
        else:
            uri = str(value or "")
            if uri and images_root and not storage.is_remote(uri) and not uri.startswith("/"):
                uri = storage.join(images_root, uri)
            data, error = b"", "" if uri else f"missing image: no {image_column} in row {key} of {container}"
        out.append({"shard": shard, "image_id": image_text.image_id(key if key is not None else uri),
                    "image_uri": uri, "captions": _captions(row[caption_column], captions_per_image),
                    "image_bytes": data, "input_error": error})
    return pa.Table.from_pylist(out, schema=ITEM_SCHEMA)


def webdataset_items(batch: pa.Table, shard_of: dict[str, tuple[int, str]], caption_field: str,
                     image_extensions: list[str], captions_per_image: int) -> pa.Table:
    """Ray Data task: samples of ``read_webdataset(..., decoder=None, include_paths=True)`` -> items."""
    out = []
    for row in batch.to_pylist():
        shard, container = shard_of[row["path"]]
        key = row["__key__"]
        found = next((ext for ext in image_extensions if row.get(ext)), None)
        captions: Any = None
        try:
            if row.get("txt"):
                captions = row["txt"].decode("utf-8")
            elif row.get("json"):
                captions = json.loads(row["json"]).get(caption_field)
        except (UnicodeDecodeError, ValueError, AttributeError):
            captions = None  # an unreadable caption is a caption-less image: recorded as "no caption"
        error = "" if found else (f"missing image: sample {key} of {container} has no "
                                  f"{'/'.join(image_extensions)} member")
        member = f"{key}.{found or image_extensions[0]}"
        out.append({"shard": shard, "image_id": image_text.image_id(key),
                    "image_uri": image_text.tar_member_uri(container, member),
                    "captions": _captions(captions, captions_per_image),
                    "image_bytes": row[found] if found else b"", "input_error": error})
    return pa.Table.from_pylist(out, schema=ITEM_SCHEMA)
