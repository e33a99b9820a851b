"""Mining configuration (pydantic, YAML-loadable): inputs, output, noun extraction and both actor pools."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ..config import PRECISION_HELP, ActorPoolConfig, ModelPreset, Precision, StrictModel


class StageConfig(ActorPoolConfig):
    """One model stage: which model, and its Ray Data actor pool."""

    preset: ModelPreset = Field("tiny", description="model preset (tiny, r101c-vitb16, swinb-vitl14) or a model "
                                            "config .json (path or s3://)")
    weights: str | None = Field(None, description="checkpoint path or s3:// URI (our layout); "
                                                  "none = the preset's random weights")
    precision: Precision = Field("auto", description=PRECISION_HELP)
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
