"""``convert``: any supported checkpoint -> a safetensors checkpoint of this package's layout.

Sources: an OVSeg release checkpoint (preset recognised from its keys), our own checkpoint (round
trip, e.g. to change dtype), or a CLIP alone (OpenAI state dict / TorchScript, OpenCLIP), which needs
``preset`` and gives a CLIP-only file. ``clip_weights`` merges a CLIP-only source into a whole model,
as OVSeg's ``tools/ovseg_replace_clip.py`` does with a fine-tuned CLIP. The result is checked against
a freshly built model of the preset with the same strict key and shape checks as loading.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .checkpoint import save_checkpoint
from .errors import CheckpointError
from ..config import check_model_preset
from ..models.ovseg import build_model, load_preset, preset_names
from .keymaps import OURS, RELEASE
from .loading import fit_state, preset_hint, read_mapped
from .manifest import manifest_presets, match_release_preset

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ConvertReport:
    source: str
    destination: str
    preset: str
    content: str  # "full" or "clip"
    layout: str
    container: str
    tensors: int
    elements: int
    not_loaded: dict[str, str] = field(default_factory=dict)
    clip_source: str = ""

    def summary(self) -> str:
        what = "whole model" if self.content == "full" else "CLIP only"
        merged = f" with CLIP from {self.clip_source}" if self.clip_source else ""
        return (f"converted {self.source} ({self.layout} layout, {self.container}){merged} -> {self.destination}: "
                f"{what}, preset {self.preset}, {self.tensors} tensors, {self.elements / 1e6:.1f}M values; "
                f"{len(self.not_loaded)} source entries left out")


def convert_checkpoint(
    source: str,
    destination: str,
    preset: str | None = None,
    clip_weights: str | None = None,
    dtype: str = "float32",
    trust_pickle: bool = False,
    say: Callable[[str], None] = log.info,
) -> ConvertReport:
    """Convert ``source`` to a safetensors file at ``destination`` (path or ``s3://``)."""
    if not str(destination).endswith(".safetensors"):
        raise ValueError(f"the converted checkpoint is written as safetensors: name it *.safetensors, "
                         f"got {destination}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    say(f"reading {source}")
    raw, mapped = read_mapped(source, trust_pickle=trust_pickle)
    preset = _resolve_preset(preset, raw.metadata.get("preset"), raw.tensors, mapped, source)
    say(f"{source}: {len(raw.tensors)} tensors, {mapped.layout} layout ({raw.container}); checking against "
        f"preset {preset}")
    model = build_model(load_preset(preset))
    expected = model.state_dict()
    hint = preset_hint(raw, mapped, model)
    not_loaded = dict(mapped.not_loaded)
    if clip_weights:
        if mapped.is_clip_only:
            raise ValueError(f"--clip-weights merges a CLIP into a whole model, but {source} is itself CLIP only")
        say(f"reading CLIP weights {clip_weights}")
        _, clip_mapped = read_mapped(clip_weights, trust_pickle=trust_pickle)
        if not clip_mapped.is_clip_only:
            raise CheckpointError(f"--clip-weights {clip_weights} is a whole-model checkpoint, not CLIP weights")
        state = fit_state(expected, mapped, source, hint=hint)
        state.update(fit_state(expected, clip_mapped, clip_weights, clip_only=True))
        not_loaded.update({f"{clip_weights}: {k}": v for k, v in clip_mapped.not_loaded.items()})
    else:
        state = fit_state(expected, mapped, source, clip_only=mapped.is_clip_only, hint=hint)
    del model, expected
    content = "clip" if mapped.is_clip_only else "full"
    out = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    metadata = {"format": "ovseg-ray", "content": content, "preset": preset, "source": str(source),
                "source_layout": mapped.layout, "source_container": raw.container,
                "clip_source": str(clip_weights or ""), "not_loaded": sorted(not_loaded)}
    say(f"writing {destination}")
    save_checkpoint(out, destination, metadata)
    report = ConvertReport(str(source), str(destination), preset, content, mapped.layout, raw.container,
                           len(out), sum(v.numel() for v in out.values()), not_loaded, str(clip_weights or ""))
    return report


def _resolve_preset(preset: str | None, recorded: str | None, tensors: dict[str, torch.Tensor],
                    mapped, source: str) -> str:
    if preset:
        return check_model_preset(preset)
    if mapped.layout == RELEASE:
        found = match_release_preset({k: tuple(v.shape) for k, v in tensors.items()})
        if found:
            return found
        raise ValueError(f"{source} is in the OVSeg release layout but fits neither release manifest "
                         f"({', '.join(manifest_presets())}) exactly: give --preset (the preset it was made for, "
                         f"e.g. tiny) to check it key by key")
    if mapped.layout == OURS and recorded in preset_names():
        return recorded
    kind = "CLIP weights" if mapped.is_clip_only else "a checkpoint without a recorded preset"
    raise ValueError(f"{source} holds {kind}: give --preset ({', '.join(preset_names())}; "
                     f"r101c-vitb16 has CLIP ViT-B/16, swinb-vitl14 ViT-L/14)")
