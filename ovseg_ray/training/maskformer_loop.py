"""The per-worker loop of ``train-maskformer`` (plain PyTorch: Ray's calls come through the session).

Step-based: passes over this worker's shard of augmented crops, in lockstep with the other workers,
until ``max_steps``. Every ``log_every_steps`` the window's loss terms and step time are logged (rank
0) and reported; every ``checkpoint_every_steps`` and at the end rank 0 saves a checkpoint that the
report carries. A restart resumes at the last checkpoint's step (its data pass starts afresh) and
ends at the same step count. Bad label files are left out of every batch, named in the log and
listed in the summary.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

from ..data import storage
from .clip_steps import model_config
from .maskformer_config import TrainMaskFormerConfig
from .maskformer_steps import (
    MaskFormerTrainer,
    build_trainee,
    export_maskformer,
    load_maskformer_checkpoint,
    save_maskformer_checkpoint,
)
from .runs import FINAL_DIR, SUMMARY_FILE, TrainSession, lockstep, maybe_crash

logger = logging.getLogger(__name__)


def _gather_skipped(skipped: dict[str, str], world: int) -> dict[str, str]:
    if world == 1:
        return dict(skipped)
    parts: list[dict[str, str]] = [{} for _ in range(world)]
    dist.all_gather_object(parts, skipped)
    return {uri: reason for part in parts for uri, reason in part.items()}


def run_maskformer_training(loop_config: dict, session: TrainSession) -> None:
    """``loop_config``: the run's config (JSON), the class names' ``text`` embeddings (C x E lists),
    ``samples`` (training images) and ``run_dir``."""
    config = TrainMaskFormerConfig.model_validate(loop_config["config"])
    settings = config.resolved()
    directory: str = loop_config["run_dir"]
    rank, world, device = session.rank, session.world, session.device
    torch.manual_seed(config.optim.seed)
    trainee = build_trainee(model_config(config.model.preset, None), config.model.init_weights, config.optim.seed)
    trainer = MaskFormerTrainer(
        trainee, torch.tensor(loop_config["text"]), lr=settings.lr, weight_decay=settings.weight_decay,
        backbone_multiplier=settings.backbone_multiplier, max_steps=settings.max_steps,
        warmup_steps=settings.warmup_steps, grad_clip_norm=config.optim.grad_clip_norm,
        precision=config.optim.precision, ignore_label=config.data.ignore_label, weights=config.loss_weights(),
        device=device, wrap=session.wrap)

    step, passes, history, resumed_at = 0, 0, [], []
    skipped: dict[str, str] = {}
    with session.latest_checkpoint() as checkpoint_dir:
        if checkpoint_dir is not None:
            progress = load_maskformer_checkpoint(checkpoint_dir, trainer)
            step, passes, history = int(progress["step"]), int(progress["passes"]), list(progress["history"])
            resumed_at = [*progress.get("resumed_at", []), step]
            skipped = dict(progress.get("skipped_labels", {}))
            if rank == 0:
                logger.info("resuming %s at step %d of %d", config.run.name, step, settings.max_steps)

    per_worker = settings.batch_size // world
    run, fault = config.run, config.fault_injection
    shard = session.shard("train")
    window = _new_window()
    while step < settings.max_steps:
        passes += 1
        batches = shard.iter_batches(batch_size=per_worker, batch_format="numpy", prefetch_batches=2)
        waiting_since = time.perf_counter()
        for batch in lockstep(batches, device):
            window["data_s"] += time.perf_counter() - waiting_since  # the step waited on the data pipeline
            ok = np.asarray(batch["ok"], bool)
            for uri, reason in zip(batch["label_uri"][~ok], batch["error"][~ok]):
                if uri not in skipped:
                    skipped[str(uri)] = str(reason)
                    logger.warning("[rank %d] skipped %s", rank, reason)
            keep = ok if ok.any() else np.arange(len(ok)) == 0  # an all-bad batch still steps, with weight 0
            images = torch.from_numpy(np.ascontiguousarray(batch["image"][keep]))
            labels = torch.from_numpy(np.ascontiguousarray(batch["label"][keep]))
            if not ok.any():
                labels.fill_(config.data.ignore_label)
            result = trainer.step(images, labels, scale=1.0 if ok.any() else 0.0)
            step += 1
            for key in ("ce", "mask", "dice"):
                window[key] += result.terms[key]
            window["loss"] += result.loss
            window["steps"] += 1
            window["images"] += int(ok.sum())
            maybe_crash(directory, "step", fault.crash_at_step, fault.crash_rank, step, rank,
                        session.wait_for_checkpoints)
            log_now = run.log_every_steps and step % run.log_every_steps == 0
            save_now = step % config.optim.checkpoint_every_steps == 0 or step == settings.max_steps
            if log_now or save_now:
                metrics = _window_metrics(window, step, passes, trainer.lr, world)
                history.append(metrics)
                if rank == 0:
                    logger.info("step %d/%d: loss %.4f (ce %.4f, mask %.4f, dice %.4f), %.3f s/step (%.3f waiting for "
                                "data), %.1f images/s, lr %.3g", step, settings.max_steps, metrics["loss"],
                                metrics["ce"], metrics["mask"], metrics["dice"], metrics["step_s"], metrics["data_s"],
                                metrics["images_per_s"], metrics["lr"])
                window = _new_window()
                with tempfile.TemporaryDirectory() as checkpoint_dir:
                    if save_now:
                        all_skipped = _gather_skipped(skipped, world)
                        if rank == 0:
                            save_maskformer_checkpoint(checkpoint_dir, trainer, {
                                "step": step, "passes": passes, "history": history, "resumed_at": resumed_at,
                                "skipped_labels": all_skipped})
                    session.report(metrics, checkpoint_dir if save_now and rank == 0 else None,
                                   f"step-{step:07d}" if save_now else None)
            if step >= settings.max_steps:
                break
            waiting_since = time.perf_counter()
    all_skipped = _gather_skipped(skipped, world)
    if rank == 0:
        _write_final(config, trainer, directory, history, resumed_at, all_skipped, loop_config)


def _new_window() -> dict:
    return {"loss": 0.0, "ce": 0.0, "mask": 0.0, "dice": 0.0, "steps": 0, "images": 0, "data_s": 0.0,
            "start": time.perf_counter()}


def _window_metrics(window: dict, step: int, passes: int, lr: float, world: int) -> dict:
    """The window's means; ``data_s`` is the part of ``step_s`` spent waiting for the next batch."""
    steps = max(1, window["steps"])
    seconds = time.perf_counter() - window["start"]
    return {"step": step, "pass": passes, "loss": window["loss"] / steps, "ce": window["ce"] / steps,
            "mask": window["mask"] / steps, "dice": window["dice"] / steps, "step_s": seconds / steps,
            "data_s": window["data_s"] / steps, "images_per_s": window["images"] * world / max(seconds, 1e-9),
            "lr": lr}


def _write_final(config: TrainMaskFormerConfig, trainer: MaskFormerTrainer, directory: str, history: list[dict],
                 resumed_at: list[int], skipped: dict[str, str], loop_config: dict) -> None:
    final_dir = storage.join(directory, FINAL_DIR)
    settings = config.resolved()
    metadata = {"preset": config.model.preset, "steps": str(settings.max_steps), "classes": config.data.classes,
                "run": directory}
    outputs = export_maskformer(trainer.trainee, final_dir, config.model.clip_weights, metadata)
    summary = {
        "run": directory, "trained": "maskformer", "steps": settings.max_steps, "batch_size": settings.batch_size,
        "images": loop_config["samples"], "classes": loop_config["classes"], "settings": settings.__dict__,
        "history": history, "resumed_at": resumed_at, "skipped_labels": skipped, "outputs": outputs,
        "config": config.model_dump(mode="json"),
    }
    storage.write_text(storage.join(final_dir, SUMMARY_FILE), json.dumps(summary, indent=2))
    logger.info("wrote %s and %s", outputs["maskformer"], outputs["model"])
