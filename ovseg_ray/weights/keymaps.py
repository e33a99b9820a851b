"""Key maps from the published checkpoint layouts onto this package's layout.

Our layout (``OVSegModel.state_dict()``): ``maskformer.*`` (MaskFormer/detectron2 names under
``backbone.`` and ``sem_seg_head.``), ``clip.*`` (open_clip names), ``region_encoder.mask_prompts``
(depth, grid*grid, width) and ``non_object_embedding`` (1, E).

Layouts read:

- ``ovseg-ray``: ours (safetensors written by ``save_checkpoint`` / ``ovseg-ray convert``);
- ``ovseg-release``: the OVSeg detectron2 checkpoints (``backbone.*``, ``sem_seg_head.*``,
  ``criterion.empty_weight``, ``clip_adapter.non_object_embedding``, ``clip_adapter.clip_model.*`` in
  OpenAI CLIP naming with the prompts at ``clip_adapter.clip_model.visual.mask_embedding``);
- ``clip``: a CLIP alone in OpenAI naming (OpenAI's state dict or TorchScript archive) or OpenCLIP's
  (``{"state_dict": ...}`` with ``module.`` prefixes), optionally with OVSeg's ``visual.mask_embedding``.

OpenAI and open_clip 3.x name every ViT CLIP tensor the same way (``visual.conv1.weight``,
``visual.class_embedding``, ``visual.positional_embedding``, ``visual.ln_pre``, ``visual.proj``,
``visual.transformer.resblocks.N.{ln_1,attn.in_proj_weight,attn.out_proj,ln_2,mlp.c_fc,mlp.c_proj}``,
``visual.ln_post``, ``token_embedding.weight``, ``positional_embedding``, ``ln_final``,
``text_projection``, ``logit_scale``), so the CLIP map is the identity plus the handful of
non-weight entries below, which are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import CheckpointError

OURS, RELEASE, CLIP = "ovseg-ray", "ovseg-release", "clip"
PROMPTS_KEY = "region_encoder.mask_prompts"
NON_OBJECT_KEY = "non_object_embedding"
OUR_PREFIXES = ("maskformer.", "clip.")
RELEASE_PREFIXES = ("backbone.", "sem_seg_head.", "clip_adapter.", "criterion.")
RELEASE_CLIP = "clip_adapter.clip_model."
RELEASE_RENAMES = {"clip_adapter.non_object_embedding": NON_OBJECT_KEY}
RELEASE_PREFIX_MAP = (("backbone.", "maskformer.backbone."), ("sem_seg_head.", "maskformer.sem_seg_head."))

# Entries of the release checkpoints that have no place in the model (see manifests/README.md).
RELEASE_NOT_LOADED = {
    "criterion.empty_weight": "training only (the loss's per-class weights)",
    "clip_adapter.pixel_mean": "constant CLIP mean colour, applied by the region preprocessor",
    "clip_adapter.pixel_std": "constant CLIP colour std, applied by the region preprocessor",
    "pixel_mean": "constant ImageNet mean colour, applied by the MaskFormer",
    "pixel_std": "constant ImageNet colour std, applied by the MaskFormer",
}
# Non-weight entries of OpenAI state dicts / TorchScript archives.
CLIP_NOT_LOADED = {
    "input_resolution": "an integer attribute of OpenAI's TorchScript model, not a weight",
    "context_length": "an integer attribute of OpenAI's TorchScript model, not a weight",
    "vocab_size": "an integer attribute of OpenAI's TorchScript model, not a weight",
    "attn_mask": "the text tower's causal mask, rebuilt by open_clip",
}
CLIP_PROMPTS = "visual.mask_embedding"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class MappedState:
    """A checkpoint's tensors renamed into our layout, with the trail back to the source names."""

    layout: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)  # our key -> source key
    not_loaded: dict[str, str] = field(default_factory=dict)  # source key -> reason
    unmapped: list[str] = field(default_factory=list)  # source keys with no place in our layout

    @property
    def is_clip_only(self) -> bool:
        return all(k.startswith("clip.") or k == PROMPTS_KEY for k in self.tensors)

    @property
    def is_maskformer_only(self) -> bool:
        """The MaskFormer part alone (``train-maskformer``'s ``maskformer.safetensors``): any CLIP goes with it."""
        return bool(self.tensors) and all(k.startswith("maskformer.") or k == NON_OBJECT_KEY for k in self.tensors)

    def add(self, ours: str, source: str, tensor: torch.Tensor) -> None:
        if ours in self.tensors:
            raise CheckpointError(f"checkpoint keys {self.origins[ours]} and {source} both map to {ours}")
        self.tensors[ours] = tensor
        self.origins[ours] = source

    def source_name(self, ours: str) -> str:
        """How the source would name our key ``ours`` (for messages about missing keys)."""
        if self.layout == RELEASE:
            return ours_to_release(ours)
        if self.layout == CLIP:
            return ours_to_clip(ours)
        return ours


def detect_layout(keys: list[str], source: str) -> str:
    stripped = [_strip_wrappers(k) for k in keys]
    if any(k.startswith(OUR_PREFIXES) or k in (PROMPTS_KEY, NON_OBJECT_KEY) for k in keys):
        return OURS
    if any(k.startswith(RELEASE_PREFIXES) for k in keys):
        return RELEASE
    if any(k.startswith("visual.") or k.startswith("token_embedding.") for k in stripped):
        return CLIP
    shown = ", ".join(sorted(keys)[:5])
    raise CheckpointError(
        f"cannot tell what {source} holds: its keys ({shown}, ...) are neither this package's layout "
        f"(maskformer.*, clip.*), an OVSeg release checkpoint (backbone.*, sem_seg_head.*, clip_adapter.*) "
        f"nor a CLIP (visual.*, token_embedding.*)"
    )


def map_to_ours(tensors: dict[str, torch.Tensor], source: str) -> MappedState:
    """Rename ``tensors`` (any supported layout) into ours; nothing is dropped silently."""
    layout = detect_layout(list(tensors), source)
    mapped = MappedState(layout)
    for key, tensor in tensors.items():
        if layout == OURS:
            mapped.add(key, key, tensor)
        elif layout == RELEASE:
            _map_release_key(mapped, key, tensor)
        else:
            _map_clip_key(mapped, key, _strip_wrappers(key), tensor)
    if not mapped.tensors:
        present = sorted([*mapped.not_loaded, *mapped.unmapped])
        raise CheckpointError(f"{source} has no model tensors (only {', '.join(present[:10])})")
    return mapped


def _map_release_key(mapped: MappedState, key: str, tensor: torch.Tensor) -> None:
    if key in RELEASE_NOT_LOADED:
        mapped.not_loaded[key] = RELEASE_NOT_LOADED[key]
    elif key in RELEASE_RENAMES:
        mapped.add(RELEASE_RENAMES[key], key, tensor)
    elif key.startswith(RELEASE_CLIP):
        _map_clip_key(mapped, key, key[len(RELEASE_CLIP):], tensor)
    elif key.startswith("backbone.") and key.endswith(".num_batches_tracked"):
        mapped.not_loaded[key] = "BatchNorm step counter (the backbone's norms are frozen)"
    else:
        for release_prefix, our_prefix in RELEASE_PREFIX_MAP:
            if key.startswith(release_prefix):
                mapped.add(our_prefix + key[len(release_prefix):], key, tensor)
                return
        mapped.unmapped.append(key)


def _map_clip_key(mapped: MappedState, source_key: str, clip_key: str, tensor: torch.Tensor) -> None:
    """One CLIP tensor in OpenAI/open_clip naming (``clip_key``) -> ``clip.*`` or the prompts."""
    last = clip_key.rsplit(".", 1)[-1]
    if clip_key in CLIP_NOT_LOADED or last == "attn_mask":
        mapped.not_loaded[source_key] = CLIP_NOT_LOADED.get(clip_key, CLIP_NOT_LOADED["attn_mask"])
    elif clip_key == CLIP_PROMPTS:
        if tensor.dim() == 3 and tensor.shape[0] == 0:
            mapped.not_loaded[source_key] = "empty mask_embedding (mask prompt depth 0)"
        else:
            mapped.add(PROMPTS_KEY, source_key, tensor)
    elif clip_key.startswith(("visual.", "transformer.", "token_embedding.", "ln_final.")) or clip_key in (
        "positional_embedding", "text_projection", "logit_scale"
    ):
        mapped.add("clip." + clip_key, source_key, tensor)
    else:
        mapped.unmapped.append(source_key)


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def ours_to_release(key: str) -> str:
    """The release checkpoint's name for our key (inverse of the map above)."""
    if key == PROMPTS_KEY:
        return RELEASE_CLIP + CLIP_PROMPTS
    if key == NON_OBJECT_KEY:
        return "clip_adapter.non_object_embedding"
    if key.startswith("clip."):
        return RELEASE_CLIP + key[len("clip."):]
    for release_prefix, our_prefix in RELEASE_PREFIX_MAP:
        if key.startswith(our_prefix):
            return release_prefix + key[len(our_prefix):]
    return key


def ours_to_clip(key: str) -> str:
    if key == PROMPTS_KEY:
        return CLIP_PROMPTS
    return key[len("clip."):] if key.startswith("clip.") else key
