"""The OVSeg model: open-vocabulary MaskFormer + mask-adapted CLIP, built from named presets.

State-dict layout (our checkpoints): ``maskformer.*`` (MaskFormer names), ``clip.*`` (open_clip
names, both towers), ``region_encoder.mask_prompts`` and ``non_object_embedding``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field, ValidationError, field_validator
from torch import nn

from ..config import PRESET_DIR, StrictModel, format_validation_error, preset_names
from ..device import resolve_device
from .clip import clip_tokenizer, create_clip, freeze_text_tower, known_clip_architectures
from .maskformer import MaskFormerConfig, OpenVocabMaskFormer
from .masked_clip import MaskedVisionEncoder
from .official import DEFAULT_LAMBDA, PRESET_MASK_THRESHOLDS
from .regions import INTERPOLATIONS
from .text import TEMPLATE_SETS

_ALIAS_PREFIX = "region_encoder.visual."


class OVSegConfig(StrictModel):
    name: str = "custom"
    description: str = ""
    clip_arch: str = Field(description="open_clip architecture name, e.g. ViT-B-16-quickgelu")
    prompt_depth: int = Field(3, ge=0, description="mask prompt depth (0 = no mask prompts)")
    maskformer: MaskFormerConfig = MaskFormerConfig()
    min_size: int = Field(512, gt=0, description="shorter image side fed to the MaskFormer")
    max_size: int = Field(2048, gt=0, description="cap on the longer side")
    region_interpolation: str = "bicubic"
    templates: str = Field("vild", description="text templates: vild (14 ViLD prompts) or bare")
    temperature: float = Field(100.0, gt=0)
    mask_threshold: float = Field(0.4, gt=0, lt=1, description="sigmoid threshold that binarises proposals "
                                  "(named presets: their official config's, see models/official.py)")
    ensemble_lambda: float = Field(DEFAULT_LAMBDA, ge=0, le=1, description="weight of CLIP in the ensemble")

    @field_validator("clip_arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if value not in known_clip_architectures():
            raise ValueError(f"unknown CLIP architecture {value!r}")
        return value

    @field_validator("region_interpolation")
    @classmethod
    def _known_interp(cls, value: str) -> str:
        if value not in INTERPOLATIONS:
            raise ValueError(f"must be one of {INTERPOLATIONS}")
        return value

    @field_validator("templates")
    @classmethod
    def _known_templates(cls, value: str) -> str:
        if value not in TEMPLATE_SETS:
            raise ValueError(f"must be one of {', '.join(map(repr, TEMPLATE_SETS))}")
        return value

    def template_list(self) -> tuple[str, ...]:
        return TEMPLATE_SETS[self.templates]


def load_preset(name: str) -> OVSegConfig:
    """A named preset, or a model config JSON file (path or s3://, e.g. a training run's model_config.json)."""
    path = PRESET_DIR / f"{name}.json"
    if path.exists():
        data = json.loads(path.read_text())
        data.setdefault("mask_threshold", PRESET_MASK_THRESHOLDS[name])
        return OVSegConfig.model_validate(data)
    if name.endswith(".json"):
        from ..data import storage

        try:
            data = json.loads(storage.read_bytes(name))
        except json.JSONDecodeError as exc:
            raise ValueError(f"model config {name} is not valid JSON: {exc}") from None
        try:
            return OVSegConfig.model_validate(data)
        except ValidationError as exc:
            raise ValueError(format_validation_error(exc, f"model config {name}")) from None
    raise ValueError(
        f"unknown model preset {name!r}; choose one of {', '.join(preset_names())} or give a model config .json"
    )


class OVSegModel(nn.Module):
    def __init__(self, config: OVSegConfig):
        super().__init__()
        self.config = config
        self.clip = create_clip(config.clip_arch)
        freeze_text_tower(self.clip)
        self.region_encoder = MaskedVisionEncoder(self.clip.visual, config.prompt_depth)
        embed_dim = self.region_encoder.output_dim
        self.maskformer = OpenVocabMaskFormer(config.maskformer, embed_dim)
        self.non_object_embedding = nn.Parameter(torch.empty(1, embed_dim))
        nn.init.normal_(self.non_object_embedding, std=self.clip.transformer.width**-0.5)
        self.tokenizer = clip_tokenizer(config.clip_arch)
        # clip.visual is shared with region_encoder.visual: keep one copy of it in state dicts.
        self.register_state_dict_post_hook(_drop_alias_keys)
        self.register_load_state_dict_pre_hook(_fill_alias_keys)

    @property
    def device(self) -> torch.device:
        return self.non_object_embedding.device


def _drop_alias_keys(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _ALIAS_PREFIX)]:
        del state_dict[key]


def _fill_alias_keys(module, state_dict, prefix, *args) -> None:
    source = prefix + "clip.visual."
    for key in [k for k in state_dict if k.startswith(source)]:
        state_dict[prefix + _ALIAS_PREFIX + key[len(source):]] = state_dict[key]


SHIPPED_WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_WEIGHTS = "default"  # the preset's shipped weights where it ships some, else seeded random ones
NO_WEIGHTS = "none"  # seeded random weights, whatever the preset


def shipped_weights(preset: str | OVSegConfig) -> str | None:
    """The weights file a preset ships in the package (only ``tiny``: trained on the open world, see
    ``models/weights/tiny.md``), or None; a config object is known by its name."""
    name = preset if isinstance(preset, str) else preset.name
    if not name.replace("-", "").isalnum():  # a model config .json path: nothing ships for it
        return None
    path = SHIPPED_WEIGHTS_DIR / f"{name}.safetensors"
    return str(path) if path.exists() else None


def resolve_weights(preset: str | OVSegConfig, weights: str | None) -> str | None:
    """The file an engine loads: ``default`` = the preset's shipped weights (random where none ship),
    ``none`` (or None) = seeded random weights, anything else a path or s3:// URI."""
    if weights is None or weights.lower() == NO_WEIGHTS:
        return None
    if weights == DEFAULT_WEIGHTS:
        return shipped_weights(preset)
    return weights


def build_model(
    preset: str | OVSegConfig = "tiny",
    weights: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    clip_weights: str | None = None,
) -> OVSegModel:
    """Build a model from a preset name or config; load ``weights`` (path or s3:// URI, ``default`` for
    the preset's shipped weights, None or ``none`` for random ones; :func:`resolve_weights`).

    ``clip_weights`` (a CLIP-only file: OpenAI, OpenCLIP, or ``ovseg-ray convert --preset`` output)
    then replaces the model's CLIP, e.g. to try a fine-tuned CLIP with released MaskFormer weights.

    Without weights the parameters are random but reproducible: every process that builds the same
    preset with the same seed gets identical weights (so Ray workers agree with each other).
    """
    config = load_preset(preset) if isinstance(preset, str) else preset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OVSegModel(config)
    weights = resolve_weights(preset, weights)
    if weights:
        load_weights(model, weights)
    if clip_weights:
        from ..weights.loading import load_clip_weights

        load_clip_weights(model, clip_weights)
    return model.to(resolve_device(device)).eval()


def load_weights(model: OVSegModel, uri: str) -> None:
    """Load a whole-model checkpoint from ``uri`` (path or s3://): our layout or an OVSeg release file.

    Mismatches raise an error listing the missing, unexpected and mis-shaped keys (see
    ``ovseg_ray.weights`` for the formats read; CLIP-only files go through ``load_clip_weights``).
    """
    from ..weights.loading import load_model_weights

    load_model_weights(model, uri)
