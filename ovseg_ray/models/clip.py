"""CLIP models built through open_clip's own factory, from local configs only (never a hub)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import open_clip
import torch

CLIP_CONFIG_DIR = Path(__file__).parent / "clip_configs"
CLIP_MEAN = tuple(open_clip.OPENAI_DATASET_MEAN)
CLIP_STD = tuple(open_clip.OPENAI_DATASET_STD)

_register_lock = threading.Lock()
_registered = False


def register_clip_configs() -> None:
    """Make this package's custom model configs (e.g. ``ovseg-tiny-vit``) known to open_clip."""
    global _registered
    with _register_lock:
        if not _registered:
            open_clip.add_model_config(CLIP_CONFIG_DIR)
            _registered = True


def known_clip_architectures() -> list[str]:
    register_clip_configs()
    return list(open_clip.list_models())


def create_clip(arch: str, device: str | torch.device = "cpu") -> open_clip.CLIP:
    """A randomly initialised CLIP of architecture ``arch`` (weights are loaded separately)."""
    register_clip_configs()
    if arch not in open_clip.list_models():
        raise ValueError(
            f"unknown CLIP architecture {arch!r}; known ones include "
            f"{', '.join(a for a in open_clip.list_models() if a.startswith(('ViT-B', 'ViT-L', 'ovseg')))}"
        )
    # open_clip warns that no pretrained weights were loaded: that is the point here.
    factory_logger = logging.getLogger()
    previous = factory_logger.level
    factory_logger.setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(arch, pretrained=None, device=device)
    finally:
        factory_logger.setLevel(previous)
    if not isinstance(model, open_clip.CLIP):
        raise ValueError(f"CLIP architecture {arch!r} is not a plain open_clip CLIP model")
    return model.eval()


def clip_tokenizer(arch: str):
    register_clip_configs()
    return open_clip.get_tokenizer(arch)


def freeze_text_tower(clip: open_clip.CLIP) -> None:
    """Stop gradients into every text-side parameter (the text encoder is never trained here)."""
    for name, param in clip.named_parameters():
        if not name.startswith("visual."):
            param.requires_grad_(False)
