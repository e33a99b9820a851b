"""What the mining pipeline's operators compute, per batch, in plain Python and PyTorch (no Ray).

``prepare_images`` (tasks: caption nouns, image decoding), :class:`ProposalStage` (actor pool 1:
MaskFormer proposals as RLE masks at the image size) and :class:`MatchingStage` (actor pool 2:
each noun to its best proposal with the masked CLIP) map pyarrow batches with fixed schemas, so
empty lists keep their types; :class:`ShardCollector` regroups the rows per output shard. Every
image leaves as exactly one row, with its pairs or its error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

from ..config import ConfigError
from ..data.coco import Shard
from ..data.pairs import ERROR_SCHEMA, PAIR_SCHEMA, decode_mask, encode_mask
from ..device import is_device_failure

logger = logging.getLogger(__name__)


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


def _build_segmenter(preset: str, weights: str | None, seed: int, device: str, threads: int, precision: str):
    import torch

    from ..inference import Segmenter
    from ..models.ovseg import build_model

    torch.set_num_threads(max(1, threads))
    return Segmenter(build_model(load_model_config(preset), weights=weights, device=device, seed=seed),
                     precision=precision)


class ProposalStage:
    """Ray Data actor (pool 1): MaskFormer proposals -> COCO RLE masks at the image size."""

    def __init__(self, preset: str, weights: str | None, seed: int, device: str, threads: int,
                 threshold: float, min_pixels: int, precision: str = "auto"):
        from .matching import ProposalMasks

        self.stage = ProposalMasks(_build_segmenter(preset, weights, seed, device, threads, precision), threshold,
                                   min_pixels)

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
                 min_score: float | None, precision: str = "auto"):
        from .matching import NounMatcher

        self.matcher = NounMatcher(_build_segmenter(preset, weights, seed, device, threads, precision), min_score)

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
