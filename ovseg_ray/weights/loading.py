"""Load any supported checkpoint into an ``OVSegModel`` with strict key and shape checks.

- ``load_model_weights``: a full model, from our layout or an OVSeg release checkpoint; or the
  MaskFormer part alone (``maskformer.*`` and ``non_object_embedding``, as ``train-maskformer`` writes
  it), which then keeps the model's CLIP (the preset's, or ``--clip-weights``).
- ``load_clip_weights``: CLIP only (OpenAI state dict or TorchScript archive, OpenCLIP checkpoint, or
  our CLIP-only file from ``ovseg-ray convert --preset P clip.pt out.safetensors``): every ``clip.*``
  tensor must be there; the mask prompts are taken when the file has them (OVSeg's
  ``visual.mask_embedding``) and kept otherwise; the MaskFormer is untouched.

Both report what they loaded and what they left out (and why) in a ``LoadReport`` and a log line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .checkpoint import check_state
from .errors import CheckpointError
from .keymaps import PROMPTS_KEY, RELEASE, MappedState, map_to_ours
from .manifest import match_release_preset
from .readers import RawCheckpoint, read_tensors

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    source: str
    container: str
    layout: str
    loaded: int
    not_loaded: dict[str, str] = field(default_factory=dict)  # source key -> reason
    kept: list[str] = field(default_factory=list)  # model keys the file does not set

    def summary(self) -> str:
        text = f"loaded {self.loaded} tensors from {self.source} ({self.layout} layout, {self.container})"
        if self.not_loaded:
            reasons = "; ".join(f"{k}: {v}" for k, v in sorted(self.not_loaded.items())[:8])
            more = f"; ... ({len(self.not_loaded) - 8} more)" if len(self.not_loaded) > 8 else ""
            text += f"; not loaded ({len(self.not_loaded)}): {reasons}{more}"
        if self.kept:
            text += f"; kept the model's own {', '.join(self.kept)}"
        return text


def read_mapped(uri: str, trust_pickle: bool = False) -> tuple[RawCheckpoint, MappedState]:
    """Read ``uri`` and rename its tensors into our layout."""
    raw = read_tensors(uri, trust_pickle=trust_pickle)
    return raw, map_to_ours(raw.tensors, uri)


def fit_state(expected: dict[str, torch.Tensor], mapped: MappedState, source: str, *, clip_only: bool = False,
              any_prompt_depth: bool = False, hint: str = "") -> dict[str, torch.Tensor]:
    """Check ``mapped`` against the model's ``expected`` state and return it in the model's dtypes.

    A full load needs every model key; a CLIP-only load needs every ``clip.*`` key and may carry the
    mask prompts. OVSeg's shared mask prompt of shape (depth, 1, width) is broadcast to every patch,
    and derived buffers (Swin's relative position index) must equal the model's own.
    ``any_prompt_depth``: mask prompts of another depth give the model their first depths (deeper
    model: the rest keep the model's values; depth-0 model: the prompts are left out; a file without
    prompts: the model keeps its own).
    """
    if clip_only:
        expected = {k: v for k, v in expected.items() if k.startswith("clip.") or k == PROMPTS_KEY}
    state = dict(mapped.tensors)
    prompts, target = state.get(PROMPTS_KEY), expected.get(PROMPTS_KEY)
    if prompts is not None and target is not None and prompts.dim() == 3 and prompts.shape[1] == 1:
        if (any_prompt_depth or prompts.shape[0] == target.shape[0]) and prompts.shape[2] == target.shape[2]:
            prompts = state[PROMPTS_KEY] = prompts.expand(prompts.shape[0], *target.shape[1:])
    if any_prompt_depth and prompts is not None:
        if target is None:
            del state[PROMPTS_KEY]
        elif prompts.dim() == 3 and prompts.shape[1:] == target.shape[1:] and prompts.shape[0] != target.shape[0]:
            shared = min(prompts.shape[0], target.shape[0])
            state[PROMPTS_KEY] = torch.cat([prompts[:shared].to(target), target[shared:]])

    def describe(key: str) -> str:
        source_key = mapped.origins.get(key) or mapped.source_name(key)
        return key if source_key == key else f"{source_key} (model key {key})"

    check_state(expected, state, source, optional={PROMPTS_KEY} if clip_only or any_prompt_depth else (),
                unexpected_extra=mapped.unmapped, describe=describe, hint=hint)
    for key in state:
        if key.endswith("relative_position_index") and not torch.equal(state[key].to(expected[key]), expected[key]):
            raise CheckpointError(f"checkpoint {source}: {describe(key)} differs from the model's window layout")
    return {k: v.to(expected[k].dtype) for k, v in state.items()}


def load_model_weights(model, uri: str, any_prompt_depth: bool = False) -> LoadReport:
    """Load a full checkpoint (ours or an OVSeg release file) into ``model``; strict, except that
    ``any_prompt_depth`` adapts mask prompts of another depth (see :func:`fit_state`)."""
    raw, mapped = read_mapped(uri)
    if mapped.is_clip_only:
        raise CheckpointError(
            f"{uri} holds only CLIP weights ({len(mapped.tensors)} tensors), not a whole OVSeg model. Load it as "
            f"CLIP weights (ovseg_ray.weights.load_clip_weights), or merge it into a full checkpoint: "
            f"`ovseg-ray convert FULL_CHECKPOINT OUT.safetensors --clip-weights {uri}`"
        )
    expected, kept = model.state_dict(), []
    if mapped.is_maskformer_only:
        expected = {k: v for k, v in expected.items() if k.startswith("maskformer.") or k == "non_object_embedding"}
        kept = ["CLIP (a MaskFormer-only checkpoint)"]
    state = fit_state(expected, mapped, uri, any_prompt_depth=any_prompt_depth, hint=preset_hint(raw, mapped, model))
    if PROMPTS_KEY in expected and PROMPTS_KEY not in state:  # a file without prompts, adapted (any_prompt_depth)
        kept.append("mask prompts (their initial values)")
    model.load_state_dict(state, strict=not kept)
    report = LoadReport(uri, raw.container, mapped.layout, len(state), dict(mapped.not_loaded), kept)
    log.info(report.summary())
    return report


def load_clip_weights(model, uri: str) -> LoadReport:
    """Replace ``model``'s CLIP (and mask prompts, when the file has them) with a CLIP-only file."""
    raw, mapped = read_mapped(uri)
    if not mapped.is_clip_only:
        raise CheckpointError(f"{uri} is a whole-model checkpoint ({mapped.layout} layout), not CLIP weights; "
                              f"load it as the model's weights instead")
    state = fit_state(model.state_dict(), mapped, uri, clip_only=True)
    model.load_state_dict(state, strict=False)
    kept = [] if PROMPTS_KEY in state or model.region_encoder.mask_prompts is None else ["mask prompts"]
    report = LoadReport(uri, raw.container, mapped.layout, len(state), dict(mapped.not_loaded), kept)
    log.info(report.summary())
    return report


def preset_hint(raw: RawCheckpoint, mapped: MappedState, model) -> str:
    """A line for mismatch errors when the file plainly belongs to another preset."""
    if mapped.layout == RELEASE:
        preset = match_release_preset({k: tuple(v.shape) for k, v in raw.tensors.items()})
    else:
        preset = raw.metadata.get("preset")
    if preset and preset != model.config.name:
        return f"this checkpoint was made for preset {preset!r}, the model is {model.config.name!r}"
    return ""
