"""Distributed (masked region, noun) pair mining on Ray Data (OVSeg section 3.2).

Pipeline, one row per image::

    from_items(images of the shards still to do)
      -> map_batches(prepare_images)            tasks: caption nouns (nltk), read + decode image
      -> map_batches(ProposalStage)              actor pool 1: MaskFormer -> masks at image size
      -> map_batches(MatchingStage)              actor pool 2: masked CLIP, noun -> best mask
      -> driver: collects finished shards, writes each one atomically

Every image leaves the pipeline as exactly one row, with its pairs or its error (missing or
corrupt image, caption without nouns, no valid proposal, ...): bad input never stops the run.

Output layout (local folder or ``s3://`` prefix)::

    OUT/pairs/shard-00000.parquet     PAIR_SCHEMA rows of the shard's images
    OUT/errors/shard-00000.parquet    ERROR_SCHEMA rows ("<reason code>: <detail>")
    OUT/shards/shard-00000.json       commit marker, written last, with the shard's counts
    OUT/manifest.json                 the settings that determine the output
    OUT/summary.json                  totals over all shards, wall time, images/s of this run
    OUT/ray_data_stats.txt            Ray Data's stats of the last run (both actor pools)

Resume and idempotence: deterministic per-shard output names, not Ray Data's checkpointing.
A shard counts as done when its marker exists; a re-run skips done shards and redoes the others,
overwriting whatever a crashed run left of them under the same names, so each pair is written
exactly once. Each file is a single atomic write (rename locally, one PUT on S3). Ray Data's
built-in checkpointing (``DataContext.checkpoint_config``) does not fit this job: it needs an id
column that is unique per output row and survives every operator, but mining turns one image into
zero or many pair rows plus rows of a second (errors) table; it commits per write task, so an
image whose rows straddle two write tasks can be marked done with half its pairs lost; and an
image that yields no pair would never be checkpointed and would be recomputed on every resume.
``manifest.json`` makes a re-run with different output-changing settings fail instead of mixing.

Loading runs as its own task operator: its memory reservation (``load_memory_mb``) keeps Ray Data
from fusing it into the proposal actors, which it does for operators with identical resource
requests.

``fail_after_shards`` stops the run with :class:`InjectedFailure` after that many shards were
committed: a crash switch for testing resume.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from ..data import storage
from ..evaluation.engine import items_dataset
from ..config import ActorPoolConfig, ConfigError, ModelPreset, StrictModel, settings_changes
from ..device import is_device_failure
from ..data.coco import CocoCaptions, Shard, shard_name
from ..data.pairs import ERROR_SCHEMA, PAIR_SCHEMA, decode_mask, encode_mask

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Configuration


class StageConfig(ActorPoolConfig):
    """One model stage: which model, and its Ray Data actor pool."""

    preset: ModelPreset = Field("tiny", description="model preset (tiny, r101c-vitb16, swinb-vitl14) or a model "
                                            "config .json (path or s3://)")
    weights: str | None = Field(None, description="checkpoint path or s3:// URI (our layout); "
                                                  "none = the preset's random weights")
    num_cpus: float = Field(0.5, ge=0, description="CPUs per actor (fractions allowed); torch threads = "
                                                   "max(1, int(num_cpus))")


class NounConfig(StrictModel):
    compounds: bool = Field(True, description="keep noun compounds whole (fire hydrant) instead of single nouns")
    extra_blocklist: list[str] = Field(default_factory=list, description="more non-visual nouns to drop")


class MiningConfig(StrictModel):
    images: str = Field(description="folder (or s3:// prefix) holding the COCO images")
    captions: str = Field(description="COCO captions JSON (path or s3:// URI)")
    output: str = Field(description="output folder or s3:// prefix")
    captions_per_image: int = Field(1, ge=1, description="captions used per image (COCO has 5; the paper uses 1)")
    max_images: int | None = Field(None, ge=1, description="only the first N images (by id)")
    shard_size: int = Field(256, ge=1, description="images per output shard (the unit of resume)")
    mask_threshold: float | None = Field(None, gt=0, lt=1,
                                         description="proposal sigmoid threshold (default: the preset's)")
    min_mask_pixels: int = Field(1, ge=1, description="proposals with fewer pixels at the image size are dropped")
    min_score: float | None = Field(None, ge=-1, le=1, description="drop pairs whose cosine similarity is below this")
    max_image_pixels: int = Field(25_000_000, ge=1, description="larger images are recorded as errors (checked on "
                                                                "the header, before decoding)")
    seed: int = Field(0, description="seed of the random weights when a preset has no weights")
    nouns: NounConfig = NounConfig()
    load_num_cpus: float = Field(0.25, gt=0, description="CPUs per image loading / noun extraction task")
    load_memory_mb: int = Field(256, ge=0, description="memory reserved per loading task (decoded images)")
    proposals: StageConfig = StageConfig()
    matching: StageConfig = StageConfig()
    fail_after_shards: int | None = Field(None, ge=1, description="testing: crash after committing this many shards")

    def output_settings(self, threshold: float, dataset_fingerprint: str, num_images: int) -> dict[str, Any]:
        """Everything that changes the mined pairs; stored in manifest.json."""
        return {
            "images": self.images, "captions": self.captions, "captions_per_image": self.captions_per_image,
            "max_images": self.max_images, "num_images": num_images, "dataset_fingerprint": dataset_fingerprint,
            "shard_size": self.shard_size, "mask_threshold": threshold, "min_mask_pixels": self.min_mask_pixels,
            "min_score": self.min_score, "max_image_pixels": self.max_image_pixels, "seed": self.seed,
            "nouns": self.nouns.model_dump(), **self.provenance(),
        }

    def provenance(self) -> dict[str, str]:
        """The models behind the pairs: in manifest.json and in every pair row."""
        return {"proposal_model": self.proposals.preset, "proposal_weights": self.proposals.weights or "",
                "clip_model": self.matching.preset, "clip_weights": self.matching.weights or ""}


class InjectedFailure(RuntimeError):
    """Raised by ``fail_after_shards``: simulates a crash part-way through a run."""


# ----------------------------------------------------------------------------------------------
# Rows between the stages (pyarrow batches with fixed schemas, so empty lists keep their types)

ERROR_FIELDS = [("error_stage", pa.string()), ("error_reason", pa.string())]
PREPARED_SCHEMA = pa.schema([
    ("shard", pa.int64()), ("image_id", pa.int64()), ("image_uri", pa.string()),
    ("captions", pa.list_(pa.string())), ("nouns", pa.list_(pa.string())),
    ("noun_captions", pa.list_(pa.int32())), ("height", pa.int32()), ("width", pa.int32()),
    ("image", pa.large_binary()),  # raw (H, W, 3) uint8 RGB
    *ERROR_FIELDS,
])
PROPOSAL_FIELDS = [("proposal_index", pa.list_(pa.int32())), ("proposal_rle", pa.list_(pa.string())),
                   ("proposal_bbox", pa.list_(pa.list_(pa.float32(), 4)))]
MATCHED_SCHEMA = pa.schema([
    ("shard", pa.int64()), ("image_id", pa.int64()), ("image_uri", pa.string()),
    ("captions", pa.list_(pa.string())), ("height", pa.int32()), ("width", pa.int32()),
    *ERROR_FIELDS,
    ("pair_noun", pa.list_(pa.string())), ("pair_caption", pa.list_(pa.int32())),
    ("pair_score", pa.list_(pa.float32())), ("pair_proposal", pa.list_(pa.int32())),
    ("pair_rle", pa.list_(pa.string())), ("pair_bbox", pa.list_(pa.list_(pa.float32(), 4))),
])

# Reason codes: the text before ':' in ERROR_SCHEMA.reason, the keys of summary's errors_by_reason.
NO_CAPTION = "no caption"
NO_NOUNS = "no nouns"
MISSING_IMAGE = "missing image"
CORRUPT_IMAGE = "corrupt image"
UNREADABLE_IMAGE = "unreadable image"
IMAGE_TOO_LARGE = "image too large"
NO_PROPOSAL = "no valid proposal"
PROPOSAL_FAILED = "proposal model failed"
MATCHING_FAILED = "matching model failed"
BELOW_MIN_SCORE = "no pair above min score"


def reason_code(reason: str) -> str:
    return reason.split(":", 1)[0]


def _image_from_row(row: dict) -> np.ndarray:
    return np.frombuffer(bytearray(row["image"]), dtype=np.uint8).reshape(row["height"], row["width"], 3)


def prepare_images(batch: pa.Table, compounds: bool, extra_blocklist: list[str], max_image_pixels: int) -> pa.Table:
    """Ray Data task: nouns of each image's captions, then the decoded image (or the error)."""
    from ..data.images import ImageDecodeError, ImageTooLargeError, load_image
    from .nouns import get_extractor

    extractor = get_extractor(compounds, extra_blocklist)
    out = {name: [] for name in PREPARED_SCHEMA.names}
    for row in batch.to_pylist():
        nouns, noun_captions, image, error = [], [], None, None
        captions = [c for c in row["captions"] if c]
        if not captions:
            error = ("nouns", f"{NO_CAPTION}: the image has no caption in the captions file")
        else:
            found = extractor.image_nouns(captions)
            nouns = [n.noun for n in found]
            noun_captions = [n.caption_index for n in found]
            if not nouns:
                error = ("nouns", f"{NO_NOUNS}: no visual noun in {' | '.join(captions)!r}")
        if error is None:
            try:
                image = load_image(row["image_uri"], max_pixels=max_image_pixels)
            except FileNotFoundError as exc:
                error = ("load", f"{MISSING_IMAGE}: {exc}")
            except ImageTooLargeError as exc:  # refused from the header, before decoding
                error = ("load", f"{IMAGE_TOO_LARGE}: {exc} (max_image_pixels)")
            except ImageDecodeError as exc:
                error = ("load", f"{CORRUPT_IMAGE}: {exc}")
            except OSError as exc:  # permissions, a directory, the store failing after its retries
                error = ("load", f"{UNREADABLE_IMAGE}: {row['image_uri']}: {type(exc).__name__}: {exc}")
        out["shard"].append(row["shard"])
        out["image_id"].append(row["image_id"])
        out["image_uri"].append(row["image_uri"])
        out["captions"].append(captions)  # the non-empty ones: noun_captions index this list
        out["nouns"].append(nouns)
        out["noun_captions"].append(noun_captions)
        out["height"].append(0 if image is None else image.shape[0])
        out["width"].append(0 if image is None else image.shape[1])
        out["image"].append(b"" if image is None else image.tobytes())
        out["error_stage"].append(error[0] if error else "")
        out["error_reason"].append(error[1] if error else "")
    return pa.table(out, schema=PREPARED_SCHEMA)


def load_model_config(preset: str):
    """The :class:`OVSegConfig` of a preset name or of a model config JSON (path or s3://)."""
    from ..models.ovseg import load_preset

    try:
        return load_preset(preset)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _build_segmenter(preset: str, weights: str | None, seed: int, device: str, threads: int):
    import torch

    from ..inference import Segmenter
    from ..models.ovseg import build_model

    torch.set_num_threads(max(1, threads))
    return Segmenter(build_model(load_model_config(preset), weights=weights, device=device, seed=seed))


class ProposalStage:
    """Ray Data actor (pool 1): MaskFormer proposals -> COCO RLE masks at the image size."""

    def __init__(self, preset: str, weights: str | None, seed: int, device: str, threads: int,
                 threshold: float, min_pixels: int):
        from .matching import ProposalMasks

        self.stage = ProposalMasks(_build_segmenter(preset, weights, seed, device, threads), threshold, min_pixels)

    def __call__(self, batch: pa.Table) -> pa.Table:
        indices, rles, boxes = [], [], []
        error_stage = batch.column("error_stage").to_pylist()
        error_reason = batch.column("error_reason").to_pylist()
        for i, row in enumerate(batch.to_pylist()):
            kept, counts, bboxes = [], [], []
            if not row["error_stage"]:
                try:
                    proposals = self.stage(_image_from_row(row))
                except Exception as exc:  # one bad image must not stop the run; it is recorded
                    if is_device_failure(exc):
                        raise  # the GPU's fault, not the image's: fail, a re-run resumes the shard
                    logger.exception("proposals failed for image %s", row["image_id"])
                    error_stage[i], error_reason[i] = "proposals", f"{PROPOSAL_FAILED}: {type(exc).__name__}: {exc}"
                else:
                    if not proposals.indices:
                        error_stage[i] = "proposals"
                        error_reason[i] = (f"{NO_PROPOSAL}: no proposal mask has >= {self.stage.min_pixels} "
                                           f"pixels at threshold {self.stage.threshold}")
                    else:
                        kept = proposals.indices
                        encoded = [encode_mask(mask) for mask in proposals.masks.numpy()]
                        counts, bboxes = [e[0] for e in encoded], [e[2] for e in encoded]
            indices.append(kept)
            rles.append(counts)
            boxes.append(bboxes)
        batch = batch.set_column(batch.schema.get_field_index("error_stage"), "error_stage",
                                 pa.array(error_stage, pa.string()))
        batch = batch.set_column(batch.schema.get_field_index("error_reason"), "error_reason",
                                 pa.array(error_reason, pa.string()))
        for (name, kind), values in zip(PROPOSAL_FIELDS, (indices, rles, boxes)):
            batch = batch.append_column(pa.field(name, kind), pa.array(values, kind))
        return batch


class MatchingStage:
    """Ray Data actor (pool 2): masked-CLIP region and noun embeddings -> best mask per noun."""

    def __init__(self, preset: str, weights: str | None, seed: int, device: str, threads: int,
                 min_score: float | None):
        from .matching import NounMatcher

        self.matcher = NounMatcher(_build_segmenter(preset, weights, seed, device, threads), min_score)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        out = {name: [] for name in MATCHED_SCHEMA.names}
        for row in batch.to_pylist():
            pairs = {"pair_noun": [], "pair_caption": [], "pair_score": [], "pair_proposal": [],
                     "pair_rle": [], "pair_bbox": []}
            stage, reason = row["error_stage"], row["error_reason"]
            if not stage:
                size = (row["height"], row["width"])
                try:
                    # RLE encoded by the proposal stage of this pipeline: no need to re-check its runs
                    rles = row["proposal_rle"]
                    masks = torch.from_numpy(np.stack([decode_mask(c, size, validate=False) for c in rles]))
                    matches = self.matcher(_image_from_row(row), masks, list(row["nouns"]))
                except Exception as exc:  # recorded, the run goes on
                    if is_device_failure(exc):
                        raise  # the GPU's fault, not the image's: fail, a re-run resumes the shard
                    logger.exception("matching failed for image %s", row["image_id"])
                    stage, reason = "matching", f"{MATCHING_FAILED}: {type(exc).__name__}: {exc}"
                else:
                    for match in matches:
                        pairs["pair_noun"].append(row["nouns"][match.noun_index])
                        pairs["pair_caption"].append(row["noun_captions"][match.noun_index])
                        pairs["pair_score"].append(match.score)
                        pairs["pair_proposal"].append(row["proposal_index"][match.proposal])
                        pairs["pair_rle"].append(row["proposal_rle"][match.proposal])
                        pairs["pair_bbox"].append(row["proposal_bbox"][match.proposal])
                    if not matches:
                        stage = "matching"
                        reason = (f"{BELOW_MIN_SCORE}: best score of {len(row['nouns'])} nouns is below "
                                  f"min_score={self.matcher.min_score}")
            for name in ("shard", "image_id", "image_uri", "captions", "height", "width"):
                out[name].append(row[name])
            out["error_stage"].append(stage)
            out["error_reason"].append(reason)
            for name, values in pairs.items():
                out[name].append(values)
        return pa.table(out, schema=MATCHED_SCHEMA)


# ----------------------------------------------------------------------------------------------
# Output: per-shard files with deterministic names


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

    def write_shard(self, shard: Shard, pairs: pa.Table, errors: pa.Table, counts: dict) -> None:
        """Errors, then pairs, then the marker: the shard is done only once all three exist."""
        storage.write_bytes(self.shard_file("errors", shard.index), _parquet_bytes(errors))
        storage.write_bytes(self.shard_file("pairs", shard.index), _parquet_bytes(pairs))
        storage.write_text(self.path("shards", f"{shard.name}.json"), json.dumps(counts, sort_keys=True))

    def check_manifest(self, settings: dict[str, Any]) -> None:
        """Write manifest.json, or refuse when an existing one was made with other settings."""
        uri = self.path(MANIFEST_FILE)
        if storage.exists(uri):
            previous = json.loads(storage.read_bytes(uri))
            changed = settings_changes(previous, settings)
            if changed:
                raise ConfigError(
                    f"output {self.root} holds pairs mined with other settings ({'; '.join(changed)}); "
                    f"use a new output folder or restore those settings to resume")
            return
        storage.write_text(uri, json.dumps(settings, indent=2, sort_keys=True))

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


class ShardCollector:
    """Driver side: gathers pipeline rows per shard and reports a shard once all its images arrived."""

    def __init__(self, shards: Iterable[Shard], provenance: dict[str, str]):
        self.shards = {shard.index: shard for shard in shards}
        self.remaining = {index: len(shard.images) for index, shard in self.shards.items()}
        self.provenance = provenance
        self._pairs: dict[int, list[dict]] = {index: [] for index in self.shards}
        self._errors: dict[int, list[dict]] = {index: [] for index in self.shards}

    def add(self, row: dict) -> Shard | None:
        index = row["shard"]
        if self.remaining.get(index, 0) <= 0:
            raise RuntimeError(f"image {row['image_id']} arrived for shard {index}, which is already complete")
        if row["error_stage"]:
            self._errors[index].append({"image_id": row["image_id"], "image_uri": row["image_uri"],
                                        "stage": row["error_stage"], "reason": row["error_reason"]})
        for k, noun in enumerate(row["pair_noun"]):
            self._pairs[index].append({
                "image_id": row["image_id"], "image_uri": row["image_uri"],
                "caption": row["captions"][row["pair_caption"][k]], "noun": noun,
                "rle_counts": row["pair_rle"][k], "rle_size": [row["height"], row["width"]],
                "bbox": row["pair_bbox"][k], "score": row["pair_score"][k],
                "proposal_index": row["pair_proposal"][k], **self.provenance,
            })
        self.remaining[index] -= 1
        return self.shards[index] if self.remaining[index] == 0 else None

    def pop(self, shard: Shard) -> tuple[pa.Table, pa.Table]:
        """The shard's pairs and errors tables, rows ordered by image id (stable)."""
        pairs = sorted(self._pairs.pop(shard.index), key=lambda r: r["image_id"])
        errors = sorted(self._errors.pop(shard.index), key=lambda r: r["image_id"])
        return pa.Table.from_pylist(pairs, schema=PAIR_SCHEMA), pa.Table.from_pylist(errors, schema=ERROR_SCHEMA)


# ----------------------------------------------------------------------------------------------
# The run


@dataclass
class MiningResult:
    summary: dict[str, Any]
    stats: str = ""  # Ray Data's stats of this run ("" when every shard was already done)
    shards_written: list[int] = field(default_factory=list)

    def summary_line(self) -> str:
        s = self.summary
        errors = ", ".join(f"{k} {v}" for k, v in sorted(s["errors_by_reason"].items())) or "none"
        return (f"mined {s['pairs']} pairs ({s['unique_nouns']} unique nouns) from {s['images_with_pairs']} of "
                f"{s['images_in']} images in {s['shards']} shards ({s['shards_skipped']} already done) in "
                f"{s['wall_time_s']:.1f}s ({s['images_per_s']:.2f} images/s); {s['errors']} errors ({errors}) "
                f"-> {s['output']}")


@dataclass(frozen=True)
class PoolPlan:
    """An actor pool as it will be requested from Ray (GPUs resolved on the driver)."""

    name: str
    min_actors: int
    max_actors: int
    num_cpus: float
    num_gpus: float
    batch_size: int

    def describe(self) -> str:
        return (f"{self.name}: {self.min_actors}-{self.max_actors} actors, {self.num_cpus:g} CPU + "
                f"{self.num_gpus:g} GPU each, batches of {self.batch_size} images")


def plan_pools(config: MiningConfig) -> tuple[PoolPlan, PoolPlan]:
    """Resolve ``num_gpus: auto`` against the cluster and check that the pools can start.

    The minimum actors of both pools plus one loading task must fit the cluster at once, or Ray
    Data would wait forever for resources that never free up.
    """
    from ..device import check_capacity, resolve_num_gpus

    pools = tuple(
        PoolPlan(name, stage.min_actors, stage.max_actors, stage.num_cpus, resolve_num_gpus(stage.num_gpus),
                 stage.batch_size)
        for name, stage in (("ProposalStage", config.proposals), ("MatchingStage", config.matching))
    )
    need_cpus = sum(p.min_actors * p.num_cpus for p in pools) + config.load_num_cpus
    need_gpus = sum(p.min_actors * p.num_gpus for p in pools)
    what = (f"the actor pools (proposals {pools[0].min_actors} x {pools[0].num_cpus:g} CPU + "
            f"{pools[0].num_gpus:g} GPU, matching {pools[1].min_actors} x {pools[1].num_cpus:g} CPU + "
            f"{pools[1].num_gpus:g} GPU, plus {config.load_num_cpus:g} CPU for a loading task)")
    try:
        check_capacity(need_cpus, need_gpus, what, "lower proposals/matching num_cpus (fractions are fine), "
                       "num_gpus or min_actors")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return pools


def build_pipeline(config: MiningConfig, shards: list[Shard], threshold: float,
                   pools: tuple[PoolPlan, PoolPlan]):
    """The lazy Ray Data dataset of the shards' images, one output row per image."""
    import ray.data

    items = [{"shard": shard.index, "image_id": image.image_id, "image_uri": image.uri,
              "captions": list(image.captions)} for shard in shards for image in shard.images]
    ds = items_dataset(items, min(config.proposals.batch_size, config.matching.batch_size))
    # The memory reservation also keeps Ray Data from fusing loading into the proposal actors (it
    # fuses operators whose resource requests are identical), so images decode on spare CPUs in
    # parallel with the models rather than inside the proposal actors.
    ds = ds.map_batches(
        prepare_images, batch_size=None, batch_format="pyarrow", num_cpus=config.load_num_cpus,
        memory=config.load_memory_mb * 2**20 or None,
        fn_kwargs={"compounds": config.nouns.compounds, "extra_blocklist": list(config.nouns.extra_blocklist),
                   "max_image_pixels": config.max_image_pixels},
    )
    stages = (
        (ProposalStage, config.proposals, {"threshold": threshold, "min_pixels": config.min_mask_pixels}),
        (MatchingStage, config.matching, {"min_score": config.min_score}),
    )
    for (stage_cls, stage, extra), pool in zip(stages, pools):
        kwargs = {"preset": stage.preset, "weights": stage.weights, "seed": config.seed,
                  "device": "cuda" if pool.num_gpus > 0 else "cpu", "threads": int(pool.num_cpus), **extra}
        ds = ds.map_batches(
            stage_cls, batch_size=pool.batch_size, batch_format="pyarrow", fn_constructor_kwargs=kwargs,
            compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
            num_gpus=pool.num_gpus, num_cpus=pool.num_cpus,
        )
    return ds


def _verbose_stats(ds) -> str:
    """``ds.stats()`` with Ray Data's extra per-operator metrics (actor counts of each pool)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    previous = context.verbose_stats_logs
    context.verbose_stats_logs = True
    try:
        return ds.stats()
    finally:
        context.verbose_stats_logs = previous


def summarize(layout: OutputLayout, dataset: CocoCaptions, num_shards: int, skipped: int,
              processed_images: int, wall_time: float) -> dict[str, Any]:
    """Totals over every committed shard (read back from the Parquet files) plus this run's speed."""
    done = layout.completed_shards()  # listed once: each listing is a round trip on S3
    pairs = layout.read_table("pairs", shards=done, columns=["image_id", "noun"])
    errors = layout.read_table("errors", shards=done, columns=["image_id", "reason"])
    by_reason = Counter(reason_code(r) for r in errors.column("reason").to_pylist())
    return {
        "output": layout.root,
        "images_in": len(dataset),
        "shards": num_shards,
        "shards_done": len(done),
        "shards_skipped": skipped,
        "complete": len(done) >= num_shards,
        "images_with_pairs": len(set(pairs.column("image_id").to_pylist())),
        "pairs": pairs.num_rows,
        "unique_nouns": len(set(pairs.column("noun").to_pylist())),
        "errors": errors.num_rows,
        "errors_by_reason": dict(sorted(by_reason.items())),
        "images_processed": processed_images,
        "wall_time_s": round(wall_time, 3),
        "images_per_s": round(processed_images / wall_time, 3) if wall_time > 0 else 0.0,
    }


@dataclass
class _RunProgress:
    written: list[int] = field(default_factory=list)
    processed: int = 0
    first_output: float | None = None  # perf_counter of the first batch out of the pipeline
    first_batch_rows: int = 0
    last_output: float | None = None

    def steady_rate(self) -> float | None:
        """Images/s after the first batch came out (start-up excluded), if more batches followed."""
        if self.first_output is None or self.last_output <= self.first_output:
            return None
        return (self.processed - self.first_batch_rows) / (self.last_output - self.first_output)


def _collect_and_write(ds, collector: ShardCollector, layout: OutputLayout, config: MiningConfig,
                       progress: _RunProgress) -> None:
    """Driver loop: stream the pipeline's rows, write every shard as soon as its last image is in."""
    batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        for batch in batches:
            progress.last_output = time.perf_counter()
            if progress.first_output is None:
                progress.first_output, progress.first_batch_rows = progress.last_output, batch.num_rows
            for row in batch.to_pylist():
                shard = collector.add(row)
                progress.processed += 1
                if shard is None:
                    continue
                pairs, errors = collector.pop(shard)
                counts = {"shard": shard.index, "images": len(shard.images), "pairs": pairs.num_rows,
                          "errors": errors.num_rows, "first_image_id": shard.image_ids[0],
                          "last_image_id": shard.image_ids[-1]}
                layout.write_shard(shard, pairs, errors, counts)
                progress.written.append(shard.index)
                logger.info("%s written: %d images, %d pairs, %d errors (%d of %d shards of this run)", shard.name,
                            len(shard.images), pairs.num_rows, errors.num_rows, len(progress.written),
                            len(collector.shards))
                if config.fail_after_shards is not None and len(progress.written) >= config.fail_after_shards:
                    raise InjectedFailure(f"injected failure after {len(progress.written)} shards "
                                          f"(fail_after_shards={config.fail_after_shards})")
    finally:
        batches.close()  # shuts the streaming executor (and its actors) down, on success or failure
    missing = [index for index, left in collector.remaining.items() if left]
    if missing:
        raise RuntimeError(f"the pipeline ended with shards {missing} incomplete; re-run to finish them")


def mine_pairs(config: MiningConfig) -> MiningResult:
    """Run (or resume) mining; Ray must already be initialised (see :func:`ovseg_ray.raycluster.init_ray`)."""
    from .nouns import load_nltk_resources

    start = time.perf_counter()
    load_nltk_resources()  # a missing resource fails here, with the download command, not in a worker
    proposal_preset = load_model_config(config.proposals.preset)
    load_model_config(config.matching.preset)
    threshold = proposal_preset.mask_threshold if config.mask_threshold is None else config.mask_threshold

    dataset = CocoCaptions(config.images, config.captions, config.captions_per_image, config.max_images)
    if len(dataset) == 0:
        raise ValueError(f"captions file {config.captions} lists no images")
    shards = dataset.shards(config.shard_size)
    layout = OutputLayout(config.output)
    layout.check_manifest(config.output_settings(threshold, dataset.fingerprint(), len(dataset)))
    done = layout.completed_shards()
    todo = [shard for shard in shards if shard.index not in done]
    logger.info("%d images in %d shards; %d shards already done, %d to mine", len(dataset), len(shards),
                len(shards) - len(todo), len(todo))

    progress = _RunProgress()
    stats = ""
    if todo:
        pools = plan_pools(config)
        for pool in pools:
            logger.info("actor pool %s", pool.describe())
        ds = build_pipeline(config, todo, threshold, pools)
        _collect_and_write(ds, ShardCollector(todo, config.provenance()), layout, config, progress)
        stats = "".join(f"actor pool {pool.describe()}\n" for pool in pools) + "\n" + _verbose_stats(ds)
        storage.write_text(layout.path("ray_data_stats.txt"), stats)

    summary = summarize(layout, dataset, len(shards), len(shards) - len(todo), progress.processed,
                        time.perf_counter() - start)
    if progress.first_output is not None:
        # Start-up (models loading in the actors) vs the rate once images flow: what a long run sees.
        summary["startup_s"] = round(progress.first_output - start, 3)
        steady = progress.steady_rate()
        summary["steady_images_per_s"] = None if steady is None else round(steady, 3)
    storage.write_text(layout.path("summary.json"), json.dumps(summary, indent=2))
    return MiningResult(summary=summary, stats=stats, shards_written=progress.written)
