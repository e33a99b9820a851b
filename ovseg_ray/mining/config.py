"""Mining configuration (pydantic, YAML-loadable): the input (COCO, Parquet or WebDataset), output, noun
extraction and both actor pools."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ..config import PRECISION_HELP, ActorPoolConfig, ModelPreset, Precision, StrictModel


class StageConfig(ActorPoolConfig):
    """One model stage: which model, and its Ray Data actor pool."""

    preset: ModelPreset = Field("tiny", description="model preset (tiny, r101c-vitb16, swinb-vitl14) or a model "
                                            "config .json (path or s3://)")
    weights: str | None = Field("default", description="checkpoint path or s3:// URI (our layout); default = "
                                "the preset's shipped weights, none = seeded random weights")
    precision: Precision = Field("auto", description=PRECISION_HELP)
    num_cpus: float = Field(0.5, ge=0, description="CPUs per actor (fractions allowed); torch threads = "
                                                   "max(1, int(num_cpus))")
    initial_actors: int | None = Field(None, ge=1, description="actors started with the pool (Ray Data's "
                                                               "initial_size; default min_actors)")
    max_tasks_in_flight_per_actor: int | None = Field(
        None, ge=1, description="batches queued per actor (Ray Data's default 2 x its concurrency); more keeps "
                                "the pool's utilisation high, which is what makes it grow")

    @model_validator(mode="after")
    def _initial_in_range(self) -> StageConfig:
        if self.initial_actors is not None and not self.min_actors <= self.initial_actors <= self.max_actors:
            raise ValueError(f"initial_actors ({self.initial_actors}) must be within min_actors..max_actors "
                             f"({self.min_actors}..{self.max_actors})")
        return self


class PoolAutoscaling(StrictModel):
    """Ray Data's actor-pool autoscaling thresholds for this run (``DataContext.autoscaling_config``);
    unset fields keep Ray Data's defaults (grow above 1.75, shrink below 0.5 utilisation)."""

    upscaling_threshold: float | None = Field(None, gt=0, description="grow a pool when its utilisation (queued "
                                                                      "batches per actor slot) reaches this")
    downscaling_threshold: float | None = Field(None, ge=0, description="shrink a pool when its utilisation "
                                                                        "falls to this")
    max_upscaling_delta: int | None = Field(None, ge=1, description="actors added to a pool at once, at most")

    def ray_data_settings(self) -> dict[str, float | int]:
        names = {"upscaling_threshold": "actor_pool_util_upscaling_threshold",
                 "downscaling_threshold": "actor_pool_util_downscaling_threshold",
                 "max_upscaling_delta": "actor_pool_max_upscaling_delta"}
        return {names[key]: value for key, value in self.model_dump().items() if value is not None}


class NounConfig(StrictModel):
    compounds: bool = Field(True, description="keep noun compounds whole (fire hydrant) instead of single nouns")
    extra_blocklist: list[str] = Field(default_factory=list, description="more non-visual nouns to drop")


class InputColumns(StrictModel):
    """Where a Parquet row or a WebDataset sample keeps its image, caption(s) and key."""

    image: str = Field("image", description="parquet: the column holding the image path/URI (string) or its "
                                            "bytes (binary)")
    caption: str = Field("caption", description="parquet: the caption column (a string or a list of strings); "
                                                "webdataset: the field of the sample's .json (a .txt wins)")
    key: str | None = Field(None, description="parquet: the column identifying a row (needed with image bytes; "
                                              "digit keys become the image ids)")
    image_extensions: list[str] = Field(["jpg", "jpeg", "png", "webp"],
                                        description="webdataset: the member extensions that hold the image, by "
                                                    "preference")


class PairFilters(StrictModel):
    """Optional filters on the quality signals of every pair (see ``ovseg_ray.mining.quality``)."""

    min_area_fraction: float | None = Field(None, ge=0, le=1, description="drop pairs whose mask covers less of "
                                                                         "the image")
    max_area_fraction: float | None = Field(None, ge=0, le=1, description="drop pairs whose mask covers more")
    min_score_margin: float | None = Field(None, ge=0, le=2, description="drop pairs whose score beats the noun's "
                                                                        "second-best proposal by less")
    min_objectness: float | None = Field(None, ge=0, le=1, description="drop pairs whose proposal's MaskFormer "
                                                                      "objectness is lower")
    max_caption_index: int | None = Field(None, ge=0, description="drop nouns of later captions")
    duplicates: Literal["flag", "drop"] = Field("flag", description="a head noun matched to the same mask as its "
                                                                    "compound: flag it (duplicate_of) or drop it")


class MiningConfig(StrictModel):
    format: Literal["coco", "parquet", "webdataset"] = Field(
        "coco", description="coco (images folder + captions JSON), parquet (image-text tables) or webdataset "
                            "(tar shards of {key}.jpg + {key}.txt/.json)")
    images: str | None = Field(None, description="coco: folder (or s3:// prefix) holding the images; parquet: "
                                                 "the base of relative image paths")
    captions: str | None = Field(None, description="coco: the captions JSON (path or s3:// URI)")
    data: str | None = Field(None, description="parquet/webdataset: a file, folder or s3:// prefix of the "
                                               "dataset's .parquet/.tar files")
    columns: InputColumns = InputColumns()
    files_per_shard: int = Field(1, ge=1, description="parquet/webdataset: input files per output shard (the "
                                                      "unit of resume)")
    output: str = Field(description="output folder or s3:// prefix")
    captions_per_image: int = Field(1, ge=1, description="captions used per image (COCO has 5; the paper uses 1)")
    max_images: int | None = Field(None, ge=1, description="coco: only the first N images (by id)")
    max_files: int | None = Field(None, ge=1, description="parquet/webdataset: only the first N files (sorted)")
    shard_size: int = Field(256, ge=1, description="coco: images per output shard (the unit of resume)")
    mask_threshold: float | None = Field(None, gt=0, lt=1,
                                         description="proposal sigmoid threshold (default: the preset's)")
    min_mask_pixels: int = Field(1, ge=1, description="proposals with fewer pixels at the image size are dropped")
    min_score: float | None = Field(None, ge=-1, le=1, description="drop pairs whose cosine similarity is below this")
    max_image_pixels: int = Field(25_000_000, ge=1, description="larger images are recorded as errors (checked on "
                                                                "the header, before decoding)")
    seed: int = Field(0, description="seed of the random weights when a preset has no weights")
    nouns: NounConfig = NounConfig()
    filters: PairFilters = PairFilters()
    load_num_cpus: float = Field(0.25, gt=0, description="CPUs per image loading / noun extraction task")
    load_memory_mb: int = Field(256, ge=0, description="memory reserved per loading task (decoded images)")
    proposals: StageConfig = StageConfig()
    matching: StageConfig = StageConfig()
    autoscaling: PoolAutoscaling = PoolAutoscaling()
    fail_after_shards: int | None = Field(None, ge=1, description="testing: crash after committing this many shards")

    @model_validator(mode="after")
    def _input_fields(self) -> MiningConfig:
        if self.format == "coco":
            missing = [name for name in ("images", "captions") if not getattr(self, name)]
            if missing:
                raise ValueError(f"format coco needs {' and '.join(missing)}")
            if self.data or self.max_files:
                raise ValueError("data and max_files are for format parquet/webdataset; coco reads images + captions")
        else:
            if not self.data:
                raise ValueError(f"format {self.format} needs data (a file, folder or s3:// prefix)")
            if self.captions or self.max_images:
                raise ValueError(f"captions and max_images are for format coco; {self.format} reads data "
                                 f"(use max_files to take fewer files)")
        return self

    def input_settings(self) -> dict[str, Any]:
        """The input's part of manifest.json."""
        if self.format == "coco":
            return {"images": self.images, "captions": self.captions, "max_images": self.max_images,
                    "shard_size": self.shard_size}
        return {"format": self.format, "data": self.data, "images": self.images,
                "columns": self.columns.model_dump(), "files_per_shard": self.files_per_shard,
                "max_files": self.max_files}

    def output_settings(self, threshold: float, dataset_fingerprint: str, input_size: int) -> dict[str, Any]:
        """Everything that changes the mined pairs; stored in manifest.json.

        ``input_size`` is what is known up front: images for COCO, input files for the file formats.
        """
        size_key = "num_images" if self.format == "coco" else "num_files"
        return {
            **self.input_settings(), "captions_per_image": self.captions_per_image, size_key: input_size,
            "dataset_fingerprint": dataset_fingerprint, "mask_threshold": threshold,
            "min_mask_pixels": self.min_mask_pixels, "min_score": self.min_score,
            "max_image_pixels": self.max_image_pixels, "seed": self.seed,
            "nouns": self.nouns.model_dump(), "filters": self.filters.model_dump(), **self.provenance(),
        }

    def provenance(self) -> dict[str, str]:
        """The models behind the pairs: in manifest.json and in every pair row."""
        return {"proposal_model": self.proposals.preset, "proposal_weights": self.proposals.weights or "",
                "clip_model": self.matching.preset, "clip_weights": self.matching.weights or ""}
