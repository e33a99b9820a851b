"""The per-worker loop of ``pretrain-clip`` (plain PyTorch: Ray's calls come through the session).

Epochs over this worker's shard of (image, caption) batches in lockstep with the others; a checkpoint
per epoch (rank 0), reported with the epoch's loss and in-batch retrieval accuracy; a restart
resumes after the last reported epoch; rank 0 writes ``final/`` at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

from ..data import storage
from ..weights.checkpoint import read_checkpoint, save_checkpoint
from .pretrain import CaptionTrainer, PretrainClipConfig, build_clip, draw_views, export_clip
from .runs import FINAL_DIR, SUMMARY_FILE, TrainSession, lockstep

logger = logging.getLogger(__name__)


def run_pretraining(loop_config: dict, session: TrainSession) -> None:
    """``loop_config``: the run's config (JSON), the number of ``images``, the CLIP input ``image_size``
    and the ``run_dir``."""
    config = PretrainClipConfig.model_validate(loop_config["config"])
    optim, directory = config.optim, loop_config["run_dir"]
    rank, world, device = session.rank, session.world, session.device
    torch.manual_seed(optim.seed)
    clip, model_config = build_clip(config.preset, optim.seed)
    steps_per_epoch = max(1, math.ceil((loop_config["images"] // world) / optim.batch_size))
    trainer = CaptionTrainer(clip, lr=optim.lr, weight_decay=optim.weight_decay, warmup_steps=optim.warmup_steps,
                             total_steps=steps_per_epoch * optim.epochs, precision=optim.precision, device=device,
                             wrap=session.wrap)
    start, history = 0, []
    with session.latest_checkpoint() as checkpoint_dir:
        if checkpoint_dir is not None:
            clip.load_state_dict(read_checkpoint(os.path.join(checkpoint_dir, "clip.safetensors")))
            trainer.load_state_dict(torch.load(os.path.join(checkpoint_dir, "optimizer.pt"), map_location=device,
                                               weights_only=True))
            with open(os.path.join(checkpoint_dir, "progress.json")) as handle:
                progress = json.load(handle)
            start, history = progress["epoch"], progress["history"]
    shard = session.shard("train")
    for epoch in range(start + 1, optim.epochs + 1):
        started = time.perf_counter()
        views = torch.Generator().manual_seed(optim.seed * 1_000_003 + epoch * 1009 + rank)  # resumes alike
        totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss * n, correct, n, skipped
        batches = shard.iter_batches(batch_size=optim.batch_size, batch_format="numpy", prefetch_batches=2,
                                     local_shuffle_buffer_size=4 * optim.batch_size,
                                     local_shuffle_seed=optim.seed + epoch)
        for batch in lockstep(batches, device):
            ok = np.asarray(batch["ok"], bool)
            totals[3] += int((~ok).sum())
            usable = ok.sum() >= 2  # a contrastive batch needs two rows; else step with weight 0
            keep = ok if usable else np.arange(len(ok)) < 2
            images, tokens = draw_views(torch.from_numpy(batch["image"][keep]), torch.from_numpy(batch["tokens"][keep]),
                                        torch.from_numpy(batch["num_captions"][keep]), loop_config["image_size"], views)
            loss, correct, count = trainer.step(images, tokens, scale=float(usable))
            if not usable:
                correct, count = 0, 0
            totals += torch.tensor([loss * count, correct, count, 0], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(totals)
        count = max(1.0, float(totals[2]))
        metrics = {"epoch": epoch, "loss": float(totals[0]) / count, "accuracy": float(totals[1]) / count,
                   "images": int(totals[2]), "skipped": int(totals[3]), "epoch_s": time.perf_counter() - started,
                   "lr": float(trainer.optimizer.param_groups[0]["lr"])}
        history.append(metrics)
        if rank == 0:
            logger.info("epoch %d/%d: loss %.4f, in-batch accuracy %.3f, %d images (%d skipped), %.1fs", epoch,
                        optim.epochs, metrics["loss"], metrics["accuracy"], metrics["images"], metrics["skipped"],
                        metrics["epoch_s"])
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            if rank == 0:
                save_checkpoint(clip, os.path.join(checkpoint_dir, "clip.safetensors"))
                torch.save(trainer.state_dict(), os.path.join(checkpoint_dir, "optimizer.pt"))
                with open(os.path.join(checkpoint_dir, "progress.json"), "w") as handle:
                    json.dump({"epoch": epoch, "history": history}, handle)
            session.report(metrics, checkpoint_dir if rank == 0 else None, f"epoch-{epoch:04d}")
    if rank == 0:
        final_dir = storage.join(directory, FINAL_DIR)
        outputs = export_clip(clip, final_dir, {"preset": config.preset, "clip_arch": model_config.clip_arch,
                                                "epochs": str(optim.epochs), "run": directory})
        summary = {"run": directory, "trained": "clip", "clip_arch": model_config.clip_arch, "epochs": optim.epochs,
                   "images": loop_config["images"], "history": history, "outputs": outputs,
                   "config": config.model_dump(mode="json")}
        storage.write_text(storage.join(final_dir, SUMMARY_FILE), json.dumps(summary, indent=2))
