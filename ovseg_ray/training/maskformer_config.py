"""Configuration of ``train-maskformer`` (plain Python, no Ray): data, model, optimisation, run.

Defaults follow the paper's MaskFormer training on COCO-Stuff-171 (``models/official.py``): per preset
the learning rate, weight decay, backbone multiplier and crop; for all, batch 32, 120K steps, warm-up
1500, AdamW, poly decay, gradient norm 0.01, loss weights class 1 / mask 20 / dice 1 / no-object 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from ..config import ModelPreset, StrictModel
from ..data.benchmarks import read_class_names
from ..models.official import MASKFORMER_BATCH, MASKFORMER_STEPS, MASKFORMER_TRAINING, MASKFORMER_WARMUP
from ..models.ovseg import load_preset
from . import runs
from .maskformer_data import AugmentConfig
from .maskformer_loss import LossWeights

RUN_RECORD = "train_maskformer_config.json"


class SegmentationDataSection(StrictModel):
    root: str = Field(description="dataset root (path or s3://): images and label PNGs below it")
    images: str = Field("images", description="image folder under root (COCO: coco/train2017)")
    labels: str = Field("stuffthingmaps", description="label PNG folder under root (COCO: "
                        "coco/stuffthingmaps_detectron2/train2017); value = class index")
    classes: str = Field("coco_stuff_171", description="the label values' class names: a shipped class list "
                         "(coco_stuff_171, ade20k_150, ...) or a JSON file (path or s3://) with a 'classes' list")
    ignore_label: int = Field(255, ge=0, description="label value of unlabelled pixels")
    limit: int | None = Field(None, ge=1, description="train on the first N samples only (by name)")
    val_images: str | None = Field(None, description="validation image folder under root (evaluated at the end)")
    val_labels: str | None = Field(None, description="validation label folder under root")
    augment: AugmentConfig = AugmentConfig()
    augment_seed: int | None = Field(None, description="None: fresh augmentations every pass; a number makes "
                                     "each sample's crop and flip deterministic")
    preprocess_cpus: float = Field(1.0, gt=0, description="CPUs per Ray Data decoding/augmentation task")
    preprocess_batch_rows: int = Field(16, ge=1, description="samples per decoding task batch (fewer: each "
                                       "Ray Data task's fixed cost weighs more; see the README's step benchmark)")

    @model_validator(mode="after")
    def _validation_pair(self) -> SegmentationDataSection:
        if (self.val_images is None) != (self.val_labels is None):
            raise ValueError("give both val_images and val_labels, or neither")
        return self


class MaskFormerModelSection(StrictModel):
    preset: ModelPreset = Field("tiny", description="model preset or a model config .json")
    init_weights: str | None = Field(None, description="start from the MaskFormer of this checkpoint (ours, "
                                     "MaskFormer-only, or a release file)")
    clip_weights: str | None = Field(None, description="the CLIP whose frozen text tower embeds the class "
                                     "names (default: the preset's seeded CLIP); inference must use the same")


class MaskFormerOptimSection(StrictModel):
    max_steps: int | None = Field(None, ge=1, description=f"optimisation steps (default {MASKFORMER_STEPS})")
    batch_size: int | None = Field(None, ge=1, description=f"images per step over all workers "
                                   f"(default {MASKFORMER_BATCH}); divisible by run.num_workers")
    lr: float | None = Field(None, gt=0, description="base learning rate (default: the preset's)")
    weight_decay: float | None = Field(None, ge=0, description="AdamW weight decay (default: the preset's)")
    backbone_multiplier: float | None = Field(None, gt=0, description="backbone lr factor (default: the preset's)")
    warmup_steps: int | None = Field(None, ge=0, description=f"linear warm-up (default min({MASKFORMER_WARMUP}, "
                                     "max_steps / 10))")
    grad_clip_norm: float | None = Field(0.01, gt=0, description="clip the global gradient norm (None = off)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast on GPU (auto = bf16 if supported); always fp32 on CPU")
    class_weight: float = Field(1.0, ge=0)
    mask_weight: float = Field(20.0, ge=0)
    dice_weight: float = Field(1.0, ge=0)
    no_object_weight: float = Field(0.1, ge=0)
    checkpoint_every_steps: int = Field(1000, ge=1, description="a checkpoint every N steps (and at the end)")
    seed: int = 0


class MaskFormerRunSection(runs.RunSection):
    storage_path: str = Field("runs/train_maskformer", description="checkpoints and outputs (path or s3://)")
    name: str = Field("maskformer", min_length=1, description="run name: STORAGE/NAME holds the run")


class MaskFormerFaultInjection(StrictModel):
    """Testing aid: one worker exits abruptly once, after this step's checkpoints are committed."""

    crash_at_step: int | None = Field(None, ge=1)
    crash_rank: int = Field(0, ge=0)


@dataclass(frozen=True)
class Resolved:
    """The numbers a run uses once the preset's defaults are filled in."""

    lr: float
    weight_decay: float
    backbone_multiplier: float
    crop_size: int
    max_steps: int
    batch_size: int  # over all workers
    warmup_steps: int


class TrainMaskFormerConfig(StrictModel):
    """The class names are embedded with the preset's templates, as inference embeds them."""

    data: SegmentationDataSection
    model: MaskFormerModelSection = MaskFormerModelSection()
    optim: MaskFormerOptimSection = MaskFormerOptimSection()
    run: MaskFormerRunSection = MaskFormerRunSection()
    fault_injection: MaskFormerFaultInjection = MaskFormerFaultInjection()

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainMaskFormerConfig:
        batch = self.optim.batch_size or MASKFORMER_BATCH
        if batch % self.run.num_workers:
            raise ValueError(f"optim.batch_size {batch} is not divisible by run.num_workers {self.run.num_workers}")
        return self

    def resolved(self) -> Resolved:
        name = load_preset(self.model.preset).maskformer.backbone
        defaults = next((v for k, v in MASKFORMER_TRAINING.items() if load_preset(k).maskformer.backbone == name),
                        MASKFORMER_TRAINING["tiny"])
        lr, wd, multiplier, crop = defaults
        steps = self.optim.max_steps or MASKFORMER_STEPS
        warmup = self.optim.warmup_steps if self.optim.warmup_steps is not None else min(MASKFORMER_WARMUP, steps // 10)
        return Resolved(
            lr=self.optim.lr if self.optim.lr is not None else lr,
            weight_decay=self.optim.weight_decay if self.optim.weight_decay is not None else wd,
            backbone_multiplier=self.optim.backbone_multiplier or multiplier,
            crop_size=self.data.augment.crop_size or crop,
            max_steps=steps, batch_size=self.optim.batch_size or MASKFORMER_BATCH, warmup_steps=warmup,
        )

    def augmentation(self) -> dict:
        """The augmentation settings with the crop size resolved."""
        return self.data.augment.model_copy(update={"crop_size": self.resolved().crop_size}).model_dump()

    def loss_weights(self) -> LossWeights:
        o = self.optim
        return LossWeights(o.class_weight, o.mask_weight, o.dice_weight, o.no_object_weight)

    def fingerprint(self) -> dict:
        """The settings a resumed or finished run must share with the command that re-runs it."""
        return self.model_dump(mode="json", include={"data", "model", "optim"})


def class_names(source: str) -> list[str]:
    """The label values' class names (``data.classes``)."""
    return read_class_names(source)


def run_dir(config: TrainMaskFormerConfig) -> str:
    return runs.run_dir(config.run.storage_path, config.run.name)
