"""Configuration of ``train-clip`` and its run folder (plain Python, no Ray; see ``runs.py``): the run
record is ``train_clip_config.json``."""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, model_validator

from ..config import ConfigError, ModelPreset, StrictModel
from ..data import storage
from ..models.ovseg import resolve_weights
from ..weights.readers import safetensors_metadata
from . import runs

logger = logging.getLogger(__name__)
RUN_RECORD = "train_clip_config.json"


class ModelSection(StrictModel):
    preset: ModelPreset = Field("tiny", description="model preset (tiny, r101c-vitb16, swinb-vitl14) or a "
                                                   "model config .json")
    init_weights: str | None = Field(None, description="starting checkpoint, our layout (path or s3://), or "
                                     "default (the preset's shipped weights); for ft-mpt the final "
                                     "model.safetensors of an ft run; none: random")
    clip_weights: str | None = Field(None, description="optional open_clip state dict replacing both CLIP towers")
    prompt_depth: int | None = Field(None, ge=0, description="mask prompt depth (default: the preset's)")


class DataSection(StrictModel):
    pairs: str | None = Field(None, description="mined pairs Parquet file or folder (path or s3://)")
    instances: str | None = Field(None, description="instead of pairs: a COCO instances JSON with masks; every "
                                  "instance is a pair with its category name (the paper's GT-mask baseline)")
    instance_images: str | None = Field(None, description="the image folder of `instances` (path or s3://)")
    shuffle_buffer: int = Field(256, ge=0, description="rows in each worker's local shuffle buffer (0 = off)")
    preprocess_cpus: float = Field(1.0, gt=0, description="CPUs per Ray Data region-decoding task")
    preprocess_batch_rows: int = Field(64, ge=1, description="pair rows per decoding task batch")
    cache_regions: bool = Field(False, description="decode every pair once and keep the regions in Ray's "
                                "object store for all epochs (small tables only: 3*S*S*4 bytes per pair)")


    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if (self.pairs is None) == (self.instances is None):
            raise ValueError("give exactly one of pairs (mined) and instances (ground truth)")
        if self.instances is not None and self.instance_images is None:
            raise ValueError("instances needs instance_images, the folder of its images")
        return self

    def source(self) -> str:
        return self.pairs or self.instances


class OptimSection(StrictModel):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1, description="pairs per worker per step")
    lr: float | None = Field(None, gt=0, description="peak learning rate (default: ft 5e-6, mpt/ft-mpt 2e-2)")
    weight_decay: float | None = Field(None, ge=0, description="AdamW weight decay (default: ft 0.2, mpt 0)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps before the cosine decay")
    grad_clip_norm: float | None = Field(None, gt=0)
    logit_scale: float = Field(100.0, gt=0, description="cosine similarity multiplier in both objectives")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast on GPU (auto = bf16 if supported); always fp32 on CPU")
    gather_negatives: bool = Field(True, description="clip objective: negatives from every worker's batch")
    seed: int = 0


class RunSection(runs.RunSection):
    storage_path: str = Field("runs/train_clip", description="checkpoints and outputs (path or s3://)")
    name: str = Field("train-clip", min_length=1, description="run name: STORAGE/NAME holds the run")


class FaultInjection(StrictModel):
    """Testing aid: one worker exits abruptly once, to exercise recovery from the last checkpoint."""

    crash_at_epoch: int | None = Field(None, ge=1, description="crash after the first step of this epoch, "
                                       "once the previous checkpoints are committed; only once per run")
    crash_rank: int = Field(1, ge=0)


class TrainClipConfig(StrictModel):
    mode: Literal["ft", "mpt", "ft-mpt"] = Field("mpt", description="ft: whole image tower; mpt: mask prompts "
                                                  "only; ft-mpt: prompts only, starting from an ft model")
    objective: Literal["clip", "vocab"] = Field("clip", description="clip: in-batch contrastive; vocab: "
                                                "cross-entropy over all training nouns")
    text_templates: Literal["vild", "bare"] = Field("vild", description="noun embeddings: ViLD template "
                                                    "ensemble or the bare noun")
    model: ModelSection = ModelSection()
    data: DataSection
    optim: OptimSection = OptimSection()
    run: RunSection = RunSection()
    fault_injection: FaultInjection = FaultInjection()

    def fingerprint(self) -> dict:
        """The settings a resumed or finished run must share with the command that re-runs it."""
        return self.model_dump(mode="json", include={"mode", "objective", "text_templates", "model", "optim"}) | {
            "pairs": self.data.source()}


def run_dir(config: TrainClipConfig) -> str:
    return runs.run_dir(config.run.storage_path, config.run.name)


def check_run_record(config: TrainClipConfig, directory: str) -> None:
    """Record the run's settings on first start; refuse to resume a run with other settings."""
    runs.check_run_record(directory, RUN_RECORD, config.fingerprint(), config.model_dump(mode="json"))


def finished_summary(config: TrainClipConfig) -> dict | None:
    """The summary of this run if it already finished (and was made with these settings), else None."""
    directory = run_dir(config)
    summary = runs.read_summary(directory)
    if summary is not None:
        check_run_record(config, directory)
    return summary


def check_start_weights(config: TrainClipConfig) -> None:
    """Starting weights exist (checked on the driver: a worker would fail and be retried in vain)."""
    for field in ("init_weights", "clip_weights"):
        given = getattr(config.model, field)
        if field == "init_weights":
            given = resolve_weights(config.model.preset, given)
        if given and not storage.exists(given):
            raise FileNotFoundError(f"model.{field} not found: {given}")
    if config.mode != "ft-mpt":
        return
    uri = config.model.init_weights
    if not uri:
        raise ConfigError("mode ft-mpt starts from an ft model: set model.init_weights to the final "
                          "model.safetensors of an ft run")
    trained_mode = safetensors_metadata(uri).get("mode")
    if trained_mode and trained_mode != "ft":
        raise ConfigError(f"model.init_weights {uri} was written by a {trained_mode!r} run; ft-mpt starts "
                          f"from the final model of an ft run")
    if not trained_mode:
        logger.warning("ft-mpt: %s carries no training record; assuming it is a fine-tuned (ft) model", uri)


