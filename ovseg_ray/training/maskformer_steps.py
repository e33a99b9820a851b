"""Training the open-vocabulary MaskFormer (paper sections 3.1, 4.1): the plain-PyTorch parts (no Ray).

The trained module holds exactly what the MaskFormer stage owns in our checkpoint layout:
``maskformer.*`` and ``non_object_embedding``. Its classifier is the cosine (x 100) between each
query's embedding and the frozen CLIP text embeddings of the training class names (template
ensemble, computed once by the caller) plus the learnable "no object" embedding.

Optimisation as MaskFormer's: AdamW, a backbone learning-rate multiplier, no weight decay on
normalisation layers, embeddings and Swin's position tables, the global gradient norm clipped,
warm-up then poly decay (power 0.9) over ``max_steps``; bf16 autocast on GPU.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ..models.clip import register_clip_configs
from ..models.maskformer import OpenVocabMaskFormer
from ..models.ovseg import OVSegConfig, build_model
from ..weights.checkpoint import check_state, read_checkpoint, save_checkpoint
from ..weights.errors import CheckpointError
from ..weights.loading import read_mapped
from .clip_steps import MODEL_CONFIG_FILE, resolve_precision
from .maskformer_loss import LossWeights, maskformer_loss

MASKFORMER_FILE = "maskformer.safetensors"  # maskformer.* + non_object_embedding: any CLIP goes with it
FULL_MODEL_FILE = "model.safetensors"  # the whole model: the trained MaskFormer with the CLIP it learnt from
CKPT_WEIGHTS = "maskformer.safetensors"
CKPT_STATE = "optimizer.pt"
CKPT_PROGRESS = "progress.json"
NO_DECAY_MODULES = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d, nn.Embedding)
NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


class MaskFormerTrainee(nn.Module):
    """The MaskFormer and its "no object" embedding, with our checkpoint's parameter names."""

    def __init__(self, config: OVSegConfig, temperature: float = 100.0):
        super().__init__()
        register_clip_configs()
        clip = open_clip.get_model_config(config.clip_arch)
        self.config = config
        self.temperature = temperature
        self.maskformer = OpenVocabMaskFormer(config.maskformer, clip["embed_dim"])
        self.non_object_embedding = nn.Parameter(torch.empty(1, clip["embed_dim"]))
        nn.init.normal_(self.non_object_embedding, std=clip["text_cfg"]["width"] ** -0.5)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) 0-255 images, (C, E) unit text embeddings -> class logits (L, B, Q, C + 1) with
        "no object" last, and mask logits (L, B, Q, S / 4, S / 4), for every decoder layer."""
        batch = self.maskformer.normalize_and_pad(list(images))
        out = self.maskformer(batch)
        classifier = torch.cat([text, F.normalize(self.non_object_embedding, dim=-1)])
        logits = self.temperature * F.normalize(out["class_embeddings"], dim=-1) @ classifier.T.to(batch.dtype)
        return logits, out["mask_logits"]


def build_trainee(config: OVSegConfig, init_weights: str | None = None, seed: int = 0) -> MaskFormerTrainee:
    """A fresh trainee (seeded), optionally starting from the MaskFormer part of a checkpoint: ours
    (whole model or MaskFormer-only) or an OVSeg release file."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trainee = MaskFormerTrainee(config)
    if init_weights:
        load_maskformer_part(trainee, init_weights)
    return trainee


def load_maskformer_part(trainee: MaskFormerTrainee, uri: str) -> None:
    """Load ``maskformer.*`` and ``non_object_embedding`` of any model checkpoint, strictly."""
    _, mapped = read_mapped(uri)
    expected = trainee.state_dict()
    state = {k: v for k, v in mapped.tensors.items() if k in expected or k.startswith("maskformer.")}
    if not state:
        raise CheckpointError(f"{uri} holds no MaskFormer weights (it looks like a {mapped.layout} CLIP file)")
    check_state(expected, state, uri)
    trainee.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def parameter_groups(trainee: MaskFormerTrainee, lr: float, weight_decay: float,
                     backbone_multiplier: float) -> list[dict]:
    """AdamW groups: backbone at ``lr * backbone_multiplier``; no decay on norms, embeddings and Swin's
    position tables (detectron2's WEIGHT_DECAY_NORM / _EMBED 0, MaskFormer's Swin rule)."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in trainee.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{name}" if module_name else name
            decay = 0.0 if isinstance(module, NO_DECAY_MODULES) or any(n in full for n in NO_DECAY_NAMES) \
                else weight_decay
            rate = lr * backbone_multiplier if full.startswith("maskformer.backbone.") else lr
            groups.setdefault((rate, decay), []).append(param)
    return [{"params": params, "lr": rate, "weight_decay": decay} for (rate, decay), params in groups.items()]


def poly_schedule(optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int,
                  warmup_factor: float = 1e-6, power: float = 0.9):
    """detectron2's WarmupPolyLR: linear warm-up from ``warmup_factor``, then (1 - step / max) ** power."""

    def factor(step: int) -> float:
        warm = 1.0
        if step < warmup_steps:
            alpha = step / warmup_steps
            warm = warmup_factor * (1 - alpha) + alpha
        return warm * (1 - min(step, max_steps) / max_steps) ** power

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class MaskFormerStep:
    loss: float
    terms: dict[str, float]  # the last decoder layer's unweighted ce, mask (focal), dice
    images: int


class MaskFormerTrainer:
    """One optimisation step of the MaskFormer on (image, label map) batches."""

    def __init__(self, trainee: MaskFormerTrainee, text: torch.Tensor, *, lr: float, weight_decay: float,
                 backbone_multiplier: float = 1.0, max_steps: int = 1, warmup_steps: int = 0,
                 grad_clip_norm: float | None = 0.01, precision: str = "auto", ignore_label: int = 255,
                 weights: LossWeights = LossWeights(), device: torch.device | str = "cpu",
                 wrap: Callable[[nn.Module], nn.Module] = lambda module: module):
        self.trainee = trainee.to(device)
        self.device = torch.device(device)
        self.text = F.normalize(text.to(self.device).float(), dim=-1)
        self.ignore_label = ignore_label
        self.weights = weights
        self.grad_clip_norm = grad_clip_norm
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.module = wrap(trainee)
        self.module.train()
        self.params = [p for p in trainee.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(parameter_groups(trainee, lr, weight_decay, backbone_multiplier), lr=lr)
        self.scheduler = poly_schedule(self.optimizer, max_steps, warmup_steps)

    @property
    def lr(self) -> float:
        return max(float(group["lr"]) for group in self.optimizer.param_groups)

    def losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            class_logits, mask_logits = self.module(images.to(self.device), self.text)
        return maskformer_loss(class_logits.float(), mask_logits.float(), labels.to(self.device), self.weights,
                               self.ignore_label)

    def step(self, images: torch.Tensor, labels: torch.Tensor, scale: float = 1.0) -> MaskFormerStep:
        """One step; ``scale`` 0 runs the step for the collectives' sake without learning from it."""
        losses = self.losses(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        (losses["loss"] * scale).backward()
        if self.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        terms = {k: float(v) for k, v in losses.items() if k != "loss"}
        return MaskFormerStep(float(losses["loss"].detach()), terms, int(images.shape[0]))

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def save_maskformer_checkpoint(directory: str, trainer: MaskFormerTrainer, progress: dict) -> None:
    save_checkpoint(trainer.trainee, os.path.join(directory, CKPT_WEIGHTS), metadata={"step": str(progress["step"])})
    torch.save(trainer.state_dict(), os.path.join(directory, CKPT_STATE))
    with open(os.path.join(directory, CKPT_PROGRESS), "w") as handle:
        json.dump(progress, handle, indent=2)


def load_maskformer_checkpoint(directory: str, trainer: MaskFormerTrainer) -> dict:
    weights = os.path.join(directory, CKPT_WEIGHTS)
    state = read_checkpoint(weights)
    check_state(trainer.trainee.state_dict(), state, weights)
    trainer.trainee.load_state_dict(state)
    trainer.load_state_dict(torch.load(os.path.join(directory, CKPT_STATE), map_location=trainer.device,
                                       weights_only=True))
    with open(os.path.join(directory, CKPT_PROGRESS)) as handle:
        return json.load(handle)


def export_maskformer(trainee: MaskFormerTrainee, out_dir: str, clip_weights: str | None,
                      metadata: dict[str, str]) -> dict[str, str]:
    """``maskformer.safetensors`` (the MaskFormer part alone: combine it with any CLIP through
    ``--clip-weights``), ``model.safetensors`` (the whole model: the trained MaskFormer with the CLIP
    whose text embeddings it learnt from, the preset's (seed 0) when none was given) and
    ``model_config.json``. Returns their URIs."""
    from ..data import storage
    from ..weights.loading import load_clip_weights

    paths = {"maskformer": storage.join(out_dir, MASKFORMER_FILE), "model": storage.join(out_dir, FULL_MODEL_FILE),
             "model_config": storage.join(out_dir, MODEL_CONFIG_FILE)}
    meta = {**metadata, "format": "ovseg-ray", "trained": "maskformer", "clip_arch": trainee.config.clip_arch}
    save_checkpoint(trainee, paths["maskformer"], metadata={**meta, "part": "maskformer"})
    model = build_model(trainee.config)
    if clip_weights:
        load_clip_weights(model, clip_weights)
    model.maskformer.load_state_dict(trainee.maskformer.state_dict())
    with torch.no_grad():
        model.non_object_embedding.copy_(trainee.non_object_embedding.detach().cpu())
    save_checkpoint(model, paths["model"], metadata={**meta, "clip_weights": clip_weights or ""})
    storage.write_text(paths["model_config"], trainee.config.model_dump_json(indent=2))
    return paths


def steps_per_epoch(images: int, batch_size: int, world: int) -> int:
    return max(1, math.ceil((images // max(1, world)) / batch_size))
