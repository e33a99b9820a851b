"""Adapting the masked CLIP to mined (region, noun) pairs: the plain-PyTorch parts (no Ray).

OVSeg sections 3.3 / 4.1. Three modes:

* ``ft``: every image-tower weight trains (ViT and mask prompts; the regions go through the same
  masked encoder as at inference). Paper defaults: AdamW, lr 5e-6, weight decay 0.2, cosine.
* ``mpt``: only the mask prompts train; every CLIP weight stays byte-identical (lr 2e-2, wd 0).
* ``ft-mpt``: ``mpt`` started from the final model of an ``ft`` run (the paper's best).

The text tower is frozen in every mode. :class:`RegionTrainer` runs one optimisation step and is
shared by the Ray Train loop (``ovseg_ray.training.engine``) and the single-process benchmark loop;
``ovseg_ray.training.pair_batches`` turns pair rows into region batches.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..data import storage
from ..device import autocast_dtype
from .losses import contrastive_loss, vocabulary_correct, vocabulary_loss
from ..models.ovseg import OVSegConfig, OVSegModel, build_model, load_preset, resolve_weights
from ..weights import load_clip_weights, load_model_weights
from ..weights.checkpoint import read_checkpoint, save_checkpoint
from ..weights.errors import CheckpointError
from ..weights.keymaps import PROMPTS_KEY

MODES = ("ft", "mpt", "ft-mpt")
OBJECTIVES = ("clip", "vocab")
# mode: (learning rate, weight decay), the paper's settings.
MODE_DEFAULTS = {"ft": (5e-6, 0.2), "mpt": (2e-2, 0.0), "ft-mpt": (2e-2, 0.0)}
VISUAL_PREFIX = "clip.visual."

# Files of a finished run (``RUN/final/``) and of each training checkpoint.
FINAL_MODEL = "model.safetensors"  # full OVSegModel state dict, our layout: build_model(weights=...)
OPEN_CLIP_MODEL = "open_clip_model.safetensors"  # full open_clip CLIP state dict (both towers)
PROMPTS_FILE = "mask_prompts.safetensors"  # {"mask_prompts": (depth, patches, width)}
MODEL_CONFIG_FILE = "model_config.json"  # the OVSegConfig the weights belong to
CKPT_WEIGHTS = "trainable.safetensors"
CKPT_STATE = "optimizer.pt"
CKPT_PROGRESS = "progress.json"


# ----------------------------------------------------------------------------------------------
# Model: starting weights, trainable parameters, export
# ----------------------------------------------------------------------------------------------

def optimizer_settings(mode: str, lr: float | None, weight_decay: float | None) -> tuple[float, float]:
    """(learning rate, weight decay): the given values, else the paper's for ``mode``."""
    default_lr, default_wd = MODE_DEFAULTS.get(mode, (None, None))
    return (default_lr if lr is None else lr), (default_wd if weight_decay is None else weight_decay)


def model_config(preset: str, prompt_depth: int | None) -> OVSegConfig:
    config = load_preset(preset)
    if prompt_depth is not None and prompt_depth != config.prompt_depth:
        config = config.model_copy(update={"prompt_depth": prompt_depth, "name": f"{config.name}-depth{prompt_depth}"})
    return config


def build_training_model(preset: str, init_weights: str | None = None, clip_weights: str | None = None,
                         prompt_depth: int | None = None, seed: int = 0) -> OVSegModel:
    """The model to train, on the CPU: preset (optionally another prompt depth) + starting weights."""
    model = build_model(model_config(preset, prompt_depth), seed=seed)
    init_weights = resolve_weights(preset, init_weights)
    if init_weights:  # our layout or a release file; mask prompts of another depth are adapted
        load_model_weights(model, init_weights, any_prompt_depth=True)
    if clip_weights:
        load_clip_weights(model, clip_weights)
    return model


def select_trainable(model: OVSegModel, mode: str) -> list[str]:
    """Set ``requires_grad`` for ``mode`` and return the trainable parameter names (our layout)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    has_prompts = model.region_encoder.mask_prompts is not None
    if mode != "ft" and not has_prompts:
        raise ValueError(f"mode {mode!r} trains mask prompts, but the model has prompt_depth 0")
    names = []
    for name, param in model.named_parameters():
        if name.startswith(VISUAL_PREFIX):
            trainable = mode == "ft"
        else:
            trainable = name == PROMPTS_KEY
        param.requires_grad_(trainable)
        if trainable:
            names.append(name)
    return names


def trainable_state(model: OVSegModel, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {name: params[name].detach() for name in names}


def load_trainable_state(model: OVSegModel, names: list[str], state: dict[str, torch.Tensor],
                         source: str) -> None:
    """Restore the trained parameters of a checkpoint; the key set must be exactly ``names``."""
    missing = sorted(set(names) - set(state))
    unexpected = sorted(set(state) - set(names))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {source} holds other parameters than this run trains: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            if params[name].shape != state[name].shape:
                raise CheckpointError(f"checkpoint {source}: {name} has shape {tuple(state[name].shape)}, "
                                      f"the model {tuple(params[name].shape)}")
            params[name].copy_(state[name])


def export_model(model: OVSegModel, out_dir: str, metadata: dict[str, str]) -> dict[str, str]:
    """Write the final outputs under ``out_dir`` (local or s3://); returns their URIs.

    * ``model.safetensors``: the full OVSeg state dict (``build_model(preset, weights=...)``,
      ``ovseg-ray segment --weights``);
    * ``open_clip_model.safetensors``: the CLIP model in open_clip's own layout, both towers
      (``open_clip.create_model(arch, pretrained=PATH)``; for ``ovseg-tiny-vit`` call
      ``ovseg_ray.models.clip.register_clip_configs()`` first);
    * ``mask_prompts.safetensors``: only the prompts, (depth, patches, width) under ``mask_prompts``;
    * ``model_config.json``: the model config (preset with the trained prompt depth).
    """
    paths = {
        "model": storage.join(out_dir, FINAL_MODEL),
        "open_clip_model": storage.join(out_dir, OPEN_CLIP_MODEL),
        "mask_prompts": storage.join(out_dir, PROMPTS_FILE),
        "model_config": storage.join(out_dir, MODEL_CONFIG_FILE),
    }
    meta = {**metadata, "clip_arch": model.config.clip_arch, "prompt_depth": str(model.config.prompt_depth)}
    save_checkpoint(model, paths["model"], metadata={**meta, "format": "ovseg-ray"})
    save_checkpoint(model.clip, paths["open_clip_model"], metadata={**meta, "format": "open_clip"})
    prompts = model.region_encoder.mask_prompts
    prompt_state = {} if prompts is None else {"mask_prompts": prompts}
    save_checkpoint(prompt_state, paths["mask_prompts"], metadata={**meta, "format": "mask_prompts"})
    storage.write_text(paths["model_config"], model.config.model_dump_json(indent=2))
    return paths


# ----------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------

def build_optimizer(model: OVSegModel, names: list[str], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on gains, biases, embeddings and prompts (as open_clip's training)."""
    params = dict(model.named_parameters())
    decay, no_decay = [], []
    for name in names:
        param = params[name]
        skip = param.ndim < 2 or name == PROMPTS_KEY or name.endswith(("positional_embedding", "class_embedding"))
        (no_decay if skip else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}]
    if decay:
        groups.insert(0, {"params": decay, "weight_decay": weight_decay})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to the base lr over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype (None = fp32). Mixed precision only on CUDA; ``auto`` = bf16 if supported."""
    return autocast_dtype(precision, device, allow_cpu=False)


class RegionEmbedder(nn.Module):
    """Unit-norm masked-CLIP embeddings of region batches: the module DDP wraps."""

    def __init__(self, model: OVSegModel):
        super().__init__()
        self.encoder = model.region_encoder

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(images, masks).float(), dim=-1)


def gather_rows(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Rows of every rank concatenated (ragged sizes allowed); this rank's rows keep their gradient.

    Returns the gathered tensor and the offset of this rank's rows. Without a process group it is
    the identity.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([local.shape[0]], device=local.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = local.detach().new_zeros((max(counts), *local.shape[1:]))
    padded[: local.shape[0]] = local.detach()
    buffers = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(buffers, padded.contiguous())
    parts = [buffer[:count] for buffer, count in zip(buffers, counts)]
    parts[rank] = local
    return torch.cat(parts), sum(counts[:rank])


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass
class StepResult:
    loss: float  # the objective (for ``clip`` with gathered negatives: over the global batch)
    correct: int  # local regions whose nearest vocabulary noun is their own
    count: int  # local regions in the step


class RegionTrainer:
    """One optimisation step of the region encoder on (region, mask, noun id) batches.

    Args:
        model: the model (its region encoder and text tower on the training device).
        mode: ``ft``, ``mpt`` or ``ft-mpt`` (decides which parameters train).
        vocabulary: (V, E) unit-norm noun embeddings from the frozen text tower; ``noun_ids`` index it.
        objective: ``clip`` (in-batch symmetric contrastive) or ``vocab`` (cross-entropy over V).
        wrap: wraps the :class:`RegionEmbedder` for data parallelism (Ray's ``prepare_model``).
        gather_negatives: for ``clip``, use the regions of every worker as negatives (global batch).
    """

    def __init__(self, model: OVSegModel, mode: str, vocabulary: torch.Tensor, *, objective: str = "clip",
                 lr: float | None = None, weight_decay: float | None = None, warmup_steps: int = 0,
                 total_steps: int = 1, logit_scale: float = 100.0, precision: str = "auto",
                 grad_clip_norm: float | None = None, gather_negatives: bool = True,
                 wrap: Callable[[nn.Module], nn.Module] = lambda module: module):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.model = model
        self.mode = mode
        self.names = select_trainable(model, mode)
        self.device = model.region_encoder.visual.conv1.weight.device
        self.vocabulary = vocabulary.to(self.device).float()
        self.objective = objective
        self.logit_scale = logit_scale
        self.grad_clip_norm = grad_clip_norm
        self.gather_negatives = gather_negatives
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.embedder = wrap(RegionEmbedder(model))
        self.embedder.train()
        self.optimizer = build_optimizer(model, self.names, *optimizer_settings(mode, lr, weight_decay))
        self.scheduler = cosine_schedule(self.optimizer, warmup_steps, total_steps)
        use_scaler = self.autocast_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler) if use_scaler else None
        self.params = [p for n, p in model.named_parameters() if n in set(self.names)]

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _loss(self, embeddings: torch.Tensor, noun_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to back-propagate, loss to report)."""
        if self.objective == "vocab":
            if embeddings.shape[0] == 0:
                zero = embeddings.sum() * 0.0
                return zero, zero
            loss = vocabulary_loss(embeddings, self.vocabulary, noun_ids, self.logit_scale)
            return loss, loss
        if self.gather_negatives:
            all_embeddings, _ = gather_rows(embeddings)
            all_ids, _ = gather_rows(noun_ids)
            scale = float(world_size())  # DDP averages gradients; each rank holds only its own share
        else:
            all_embeddings, all_ids, scale = embeddings, noun_ids, 1.0
        if all_embeddings.shape[0] == 0:
            zero = embeddings.sum() * 0.0
            return zero, zero
        loss = contrastive_loss(all_embeddings, self.vocabulary[all_ids], all_ids, self.logit_scale)
        # Connect the (possibly empty) local rows to the graph so DDP's backward runs on every rank.
        return loss * scale + embeddings.sum() * 0.0, loss

    def step(self, regions: torch.Tensor, masks: torch.Tensor, noun_ids: torch.Tensor) -> StepResult:
        regions = regions.to(self.device, non_blocking=True)
        masks = masks.to(self.device, non_blocking=True).float()
        noun_ids = noun_ids.to(self.device, non_blocking=True).long()
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            embeddings = self.embedder(regions, masks)
        embeddings = embeddings.float()
        backward_loss, reported = self._loss(embeddings, noun_ids)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(backward_loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            backward_loss.backward()
        if self.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        correct = vocabulary_correct(embeddings.detach(), self.vocabulary, noun_ids)
        return StepResult(float(reported.detach()), correct, int(noun_ids.shape[0]))

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def save_training_checkpoint(directory: str, trainer: RegionTrainer, progress: dict) -> None:
    """Trained parameters (safetensors, our layout), optimizer/schedule state and progress JSON."""
    save_checkpoint(trainable_state(trainer.model, trainer.names), os.path.join(directory, CKPT_WEIGHTS),
                    metadata={"mode": trainer.mode, "epoch": str(progress.get("epoch", 0))})
    torch.save(trainer.state_dict(), os.path.join(directory, CKPT_STATE))
    with open(os.path.join(directory, CKPT_PROGRESS), "w") as handle:
        json.dump(progress, handle, indent=2)


def load_training_checkpoint(directory: str, trainer: RegionTrainer) -> dict:
    """Restore what :func:`save_training_checkpoint` wrote; returns the progress record."""
    weights = os.path.join(directory, CKPT_WEIGHTS)
    load_trainable_state(trainer.model, trainer.names, read_checkpoint(weights), weights)
    trainer.load_state_dict(torch.load(os.path.join(directory, CKPT_STATE), map_location=trainer.device,
                                       weights_only=True))
    with open(os.path.join(directory, CKPT_PROGRESS)) as handle:
        return json.load(handle)
