"""Shard files written by workers (plain Python, no Ray): parts while a shard is mined, then its commit.

The pipeline's last operator, :func:`write_parts`, writes the rows of each batch as one part file
per shard (``OUT/parts/shard-N/<uuid>.parquet``) and hands the driver only ``(shard, images,
part)``. Once the driver has seen as many images of a shard as it holds, a worker runs
:func:`commit_shard`: it reads exactly the parts the driver names (never a crashed run's leftovers),
writes the shard's errors, pairs and marker (marker last), then removes the shard's parts folder.
A part written by a task attempt that Ray retried is never named, so each pair is committed once.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..data.pair_store import OutputLayout
from ..data.pairs import ERROR_SCHEMA, PAIR_SCHEMA
from .stages import MATCHED_SCHEMA, reason_code

PART_COUNT_SCHEMA = pa.schema([("shard", pa.int64()), ("images", pa.int64()), ("part", pa.string())])


def write_parts(batch: pa.Table, output: str) -> pa.Table:
    """Ray Data task (the last operator): one part file per shard in the batch; returns their counts."""
    layout = OutputLayout(output)
    out: dict[str, list] = {name: [] for name in PART_COUNT_SCHEMA.names}
    for index in sorted(set(batch.column("shard").to_pylist())):
        rows = batch.filter(pc.equal(batch.column("shard"), index))
        out["shard"].append(index)
        out["images"].append(rows.num_rows)
        out["part"].append(layout.write_part(index, uuid.uuid4().hex, rows))
    return pa.table(out, schema=PART_COUNT_SCHEMA)


def shard_tables(rows: pa.Table, provenance: dict[str, str]) -> tuple[pa.Table, pa.Table]:
    """A shard's pipeline rows (one per image) -> its pairs and errors tables, ordered by image id
    (stable: an image's pairs keep their noun order)."""
    pairs, errors = [], []
    for row in sorted(rows.to_pylist(), key=lambda r: r["image_id"]):
        if row["error_stage"]:
            errors.append({"image_id": row["image_id"], "image_uri": row["image_uri"],
                           "stage": row["error_stage"], "reason": row["error_reason"]})
        for k, noun in enumerate(row["pair_noun"]):
            pairs.append({
                "image_id": row["image_id"], "image_uri": row["image_uri"],
                "caption": row["captions"][row["pair_caption"][k]], "noun": noun,
                "rle_counts": row["pair_rle"][k], "rle_size": [row["height"], row["width"]],
                "bbox": row["pair_bbox"][k], "score": row["pair_score"][k],
                "proposal_index": row["pair_proposal"][k], **provenance,
                "area_fraction": row["pair_area"][k], "score_margin": row["pair_margin"][k],
                "objectness": row["pair_objectness"][k], "caption_index": row["pair_caption"][k],
                "duplicate_of": row["pair_duplicate_of"][k],
            })
    return pa.Table.from_pylist(pairs, schema=PAIR_SCHEMA), pa.Table.from_pylist(errors, schema=ERROR_SCHEMA)


def commit_shard(output: str, index: int, parts: Sequence[str], provenance: dict[str, str],
                 marker: dict[str, Any]) -> dict[str, Any]:
    """Worker task: merge the named parts into the shard's files, marker last; returns its counts."""
    layout = OutputLayout(output)
    tables = layout.read_parts(parts)
    rows = pa.concat_tables(tables) if tables else MATCHED_SCHEMA.empty_table()
    pairs, errors = shard_tables(rows, provenance)
    counts = {"shard": index, "images": rows.num_rows, "pairs": pairs.num_rows, "errors": errors.num_rows,
              "images_with_pairs": len(set(pairs.column("image_id").to_pylist())),
              "nouns": sorted(set(pairs.column("noun").to_pylist())),
              "errors_by_reason": dict(sorted(Counter(reason_code(r) for r in errors.column("reason").to_pylist())
                                              .items())), **marker}
    layout.write_shard(index, pairs, errors, counts)
    layout.remove_parts(index)
    return counts
