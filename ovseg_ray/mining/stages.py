"""What the mining pipeline's operators compute, per batch, in plain Python and PyTorch (no Ray).

``prepare_images`` (tasks: caption nouns, image decoding), :class:`ProposalStage` (actor pool 1:
MaskFormer proposals as RLE masks at the image size) and :class:`MatchingStage` (actor pool 2:
each noun to its best proposal with the masked CLIP) map pyarrow batches with fixed schemas, so
empty lists keep their types. Every image leaves as exactly one row, with its pairs or its error;
``shards`` writes those rows to the output.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from ..config import ConfigError
from ..data.pairs import decode_mask, encode_mask
from ..device import batch_or_none, is_device_failure

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
                   ("proposal_bbox", pa.list_(pa.list_(pa.float32(), 4))),
                   ("proposal_objectness", pa.list_(pa.float32()))]
MATCHED_SCHEMA = pa.schema([
    ("shard", pa.int64()), ("image_id", pa.int64()), ("image_uri", pa.string()),
    ("captions", pa.list_(pa.string())), ("height", pa.int32()), ("width", pa.int32()),
    *ERROR_FIELDS,
    ("pair_noun", pa.list_(pa.string())), ("pair_caption", pa.list_(pa.int32())),
    ("pair_score", pa.list_(pa.float32())), ("pair_proposal", pa.list_(pa.int32())),
    ("pair_rle", pa.list_(pa.string())), ("pair_bbox", pa.list_(pa.list_(pa.float32(), 4))),
    ("pair_area", pa.list_(pa.float32())), ("pair_margin", pa.list_(pa.float32())),
    ("pair_objectness", pa.list_(pa.float32())), ("pair_duplicate_of", pa.list_(pa.string())),
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
FILTERED_OUT = "no pair passes the filters"


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (botocore's messages span several)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def reason_code(reason: str) -> str:
    return reason.split(":", 1)[0]


def _image_from_row(row: dict) -> np.ndarray:
    return np.frombuffer(bytearray(row["image"]), dtype=np.uint8).reshape(row["height"], row["width"], 3)


def prepare_images(batch: pa.Table, compounds: bool, extra_blocklist: list[str], max_image_pixels: int) -> pa.Table:
    """Ray Data task: nouns of each image's captions, then the decoded image (or the error)."""
    from ..data.images import ImageDecodeError, ImageTooLargeError, decode_image, load_image
    from .nouns import get_extractor

    extractor = get_extractor(compounds, extra_blocklist)
    out = {name: [] for name in PREPARED_SCHEMA.names}
    names = set(batch.column_names)
    for row in batch.to_pylist():
        nouns, noun_captions, image, error = [], [], None, None
        captions = [c for c in row["captions"] if c]
        if row.get("input_error"):
            error = ("load", row["input_error"])
        elif not captions:
            error = ("nouns", f"{NO_CAPTION}: the image has no caption in the input")
        else:
            found = extractor.image_nouns(captions)
            nouns = [n.noun for n in found]
            noun_captions = [n.caption_index for n in found]
            if not nouns:
                error = ("nouns", f"{NO_NOUNS}: no visual noun in {' | '.join(captions)!r}")
        if error is None:
            try:
                data = row["image_bytes"] if "image_bytes" in names else None
                if data:  # the input held the image: decode it where it is
                    image = decode_image(data, source=row["image_uri"], max_pixels=max_image_pixels)
                else:
                    image = load_image(row["image_uri"], max_pixels=max_image_pixels)
            except FileNotFoundError as exc:
                error = ("load", f"{MISSING_IMAGE}: {exc}")
            except ImageTooLargeError as exc:  # refused from the header, before decoding
                error = ("load", f"{IMAGE_TOO_LARGE}: {exc} (max_image_pixels)")
            except ImageDecodeError as exc:
                error = ("load", f"{CORRUPT_IMAGE}: {exc}")
            except Exception as exc:  # noqa: BLE001 - permissions, a directory, an unreachable or refusing store
                error = ("load", f"{UNREADABLE_IMAGE}: {row['image_uri']}: {one_line(exc)}")
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


def node_local_weights(uri: str | None) -> str | None:
    """A remote checkpoint copied once per node: the first actor on a node downloads it (under a file
    lock) into ``$OVSEG_RAY_CACHE/weights``, every later actor there reads the local copy."""
    import fcntl
    import hashlib
    import os

    from ..data import storage
    from .wordnet import cache_root

    if not uri or not storage.is_remote(uri):
        return uri
    folder = cache_root() / "weights" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    local = folder / uri.rstrip("/").rsplit("/", 1)[-1]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not local.exists():
            partial = local.with_name(local.name + f".part-{os.getpid()}")
            partial.write_bytes(storage.read_bytes(uri))
            os.replace(partial, local)
    return str(local)


def _build_segmenter(preset: str, weights: str | None, seed: int, device: str, threads: int, precision: str):
    import torch

    from ..inference import Segmenter
    from ..models.ovseg import build_model

    torch.set_num_threads(max(1, threads))
    model = build_model(load_model_config(preset), weights=node_local_weights(weights), device=device, seed=seed)
    return Segmenter(model, precision=precision)


class ProposalStage:
    """Ray Data actor (pool 1): MaskFormer proposals -> COCO RLE masks at the image size."""

    def __init__(self, preset: str, weights: str | None, seed: int, device: str, threads: int,
                 threshold: float, min_pixels: int, precision: str = "auto"):
        from .matching import ProposalMasks

        self.stage = ProposalMasks(_build_segmenter(preset, weights, seed, device, threads, precision), threshold,
                                   min_pixels)

    def __call__(self, batch: pa.Table) -> pa.Table:
        indices, rles, boxes, objectness = [], [], [], []
        error_stage = batch.column("error_stage").to_pylist()
        error_reason = batch.column("error_reason").to_pylist()
        rows = batch.to_pylist()
        readable = [row for row in rows if not row["error_stage"]]
        batched = None
        if len(readable) > 1:
            batched = batch_or_none(lambda: self.stage.many([_image_from_row(row) for row in readable],
                                                            [list(row["nouns"]) for row in readable]),
                                    len(readable), "proposals")
        batched = iter(batched) if batched else None
        for i, row in enumerate(rows):
            kept, counts, bboxes, scores = [], [], [], []
            if not row["error_stage"]:
                try:
                    proposals = next(batched) if batched else self.stage(_image_from_row(row), list(row["nouns"]))
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
                        kept, scores = proposals.indices, proposals.objectness
                        encoded = [encode_mask(mask) for mask in proposals.masks.numpy()]
                        counts, bboxes = [e[0] for e in encoded], [e[2] for e in encoded]
            indices.append(kept)
            rles.append(counts)
            boxes.append(bboxes)
            objectness.append(scores)
        batch = batch.set_column(batch.schema.get_field_index("error_stage"), "error_stage",
                                 pa.array(error_stage, pa.string()))
        batch = batch.set_column(batch.schema.get_field_index("error_reason"), "error_reason",
                                 pa.array(error_reason, pa.string()))
        for (name, kind), values in zip(PROPOSAL_FIELDS, (indices, rles, boxes, objectness)):
            batch = batch.append_column(pa.field(name, kind), pa.array(values, kind))
        return batch


class MatchingStage:
    """Ray Data actor (pool 2): masked-CLIP region and noun embeddings -> best mask per noun."""

    def __init__(self, preset: str, weights: str | None, seed: int, device: str, threads: int,
                 min_score: float | None, filters: dict | None = None, precision: str = "auto"):
        from .matching import NounMatcher

        self.matcher = NounMatcher(_build_segmenter(preset, weights, seed, device, threads, precision), min_score)
        self.filters = filters or {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        out = {name: [] for name in MATCHED_SCHEMA.names}
        for row in batch.to_pylist():
            pairs = {name: [] for name in MATCHED_SCHEMA.names if name.startswith("pair_")}
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
                    kept = self._quality(row, masks, matches)
                    for match, signals in kept:
                        pairs["pair_noun"].append(row["nouns"][match.noun_index])
                        pairs["pair_caption"].append(signals.caption_index)
                        pairs["pair_score"].append(match.score)
                        pairs["pair_proposal"].append(row["proposal_index"][match.proposal])
                        pairs["pair_rle"].append(row["proposal_rle"][match.proposal])
                        pairs["pair_bbox"].append(row["proposal_bbox"][match.proposal])
                        pairs["pair_area"].append(signals.area_fraction)
                        pairs["pair_margin"].append(signals.score_margin)
                        pairs["pair_objectness"].append(signals.objectness)
                        pairs["pair_duplicate_of"].append(signals.duplicate_of)
                    if not matches:
                        stage = "matching"
                        reason = (f"{BELOW_MIN_SCORE}: best score of {len(row['nouns'])} nouns is below "
                                  f"min_score={self.matcher.min_score}")
                    elif not kept:
                        stage = "matching"
                        reason = f"{FILTERED_OUT}: {len(matches)} pairs, none passes {self._active_filters()}"
            for name in ("shard", "image_id", "image_uri", "captions", "height", "width"):
                out[name].append(row[name])
            out["error_stage"].append(stage)
            out["error_reason"].append(reason)
            for name, values in pairs.items():
                out[name].append(values)
        return pa.table(out, schema=MATCHED_SCHEMA)

    def _quality(self, row: dict, masks, matches) -> list:
        """(match, signals) of the pairs that pass the filters, duplicates flagged (see ``quality``)."""
        from .quality import PairSignals, duplicates_of, keep

        areas = (masks.flatten(1).sum(dim=1).double() / float(row["height"] * row["width"])).tolist()
        nouns = [row["nouns"][m.noun_index] for m in matches]
        duplicates = duplicates_of(nouns, [m.proposal for m in matches])
        signals = [PairSignals(m.noun_index, m.proposal, m.score, areas[m.proposal], m.margin,
                               row["proposal_objectness"][m.proposal], row["noun_captions"][m.noun_index], dup)
                   for m, dup in zip(matches, duplicates)]
        return [(m, s) for m, s in zip(matches, signals) if keep(s, self.filters)]

    def _active_filters(self) -> str:
        active = {k: v for k, v in self.filters.items() if v is not None and (k != "duplicates" or v == "drop")}
        return ", ".join(f"{k}={v}" for k, v in sorted(active.items())) or "the filters"

