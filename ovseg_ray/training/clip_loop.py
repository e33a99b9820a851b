"""The per-worker loop of ``train-clip`` (plain PyTorch: Ray's calls come through the session).

Each epoch: this worker's shard of decoded region batches, in lockstep with the other workers, one
:class:`RegionTrainer` step per batch; totals all-reduced; rank 0 saves a checkpoint that the session
reports with the epoch's metrics. A restart (a retried worker failure or a re-run) resumes after the
last reported epoch. Rank 0 writes ``final/`` when every epoch is done.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time

import torch
import torch.distributed as dist

from ..data import storage
from ..models.text import TEMPLATE_SETS, TextEmbedder
from .clip_config import TrainClipConfig
from .clip_steps import (
    RegionTrainer,
    build_training_model,
    export_model,
    load_training_checkpoint,
    save_training_checkpoint,
)
from .pair_batches import batch_tensors
from .runs import FINAL_DIR, SUMMARY_FILE, TrainSession, lockstep, maybe_crash

logger = logging.getLogger(__name__)
STOPPED_FILE = "stopped.json"  # an epoch without any usable pair: why the run stopped untrained


def run_clip_training(loop_config: dict, session: TrainSession) -> None:
    """``loop_config``: the run's config (JSON), its ``vocabulary``, pair ``rows`` and ``run_dir``."""
    config = TrainClipConfig.model_validate(loop_config["config"])
    vocabulary: list[str] = loop_config["vocabulary"]
    directory: str = loop_config["run_dir"]
    rank, world, device = session.rank, session.world, session.device
    optim = config.optim
    torch.manual_seed(optim.seed)

    model = build_training_model(config.model.preset, config.model.init_weights, config.model.clip_weights,
                                 config.model.prompt_depth, seed=optim.seed)
    model.clip.to(device)
    model.region_encoder.to(device)
    text = TextEmbedder(model.clip, model.tokenizer, TEMPLATE_SETS[config.text_templates],
                        cache_size=len(vocabulary) + 1)
    vocabulary_embeddings = text(vocabulary)
    noun_index = {noun: index for index, noun in enumerate(vocabulary)}
    steps_per_epoch = max(1, math.ceil((loop_config["rows"] // world) / optim.batch_size))
    trainer = RegionTrainer(
        model, config.mode, vocabulary_embeddings, objective=config.objective, lr=optim.lr,
        weight_decay=optim.weight_decay, warmup_steps=optim.warmup_steps,
        total_steps=steps_per_epoch * optim.epochs, logit_scale=optim.logit_scale, precision=optim.precision,
        grad_clip_norm=optim.grad_clip_norm, gather_negatives=optim.gather_negatives, wrap=session.wrap,
    )

    history: list[dict] = []
    resumed_after: list[int] = []  # the epoch of the checkpoint each restart (retry or re-run) began from
    start_epoch = 0
    with session.latest_checkpoint() as checkpoint_dir:
        if checkpoint_dir is not None:
            progress = load_training_checkpoint(checkpoint_dir, trainer)
            start_epoch, history = int(progress["epoch"]), list(progress["history"])
            resumed_after = [*progress.get("resumed_after", []), start_epoch]
            if rank == 0:
                logger.info("resuming %s from its checkpoint after epoch %d of %d", config.run.name, start_epoch,
                            optim.epochs)

    shard = session.shard("train")
    fault = config.fault_injection
    for epoch in range(start_epoch + 1, optim.epochs + 1):
        started = time.perf_counter()
        totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss * n, correct, n, skipped
        reasons: list[str] = []
        steps = 0
        batches = shard.iter_batches(
            batch_size=optim.batch_size, batch_format="numpy", prefetch_batches=2,
            local_shuffle_buffer_size=config.data.shuffle_buffer or None,
            local_shuffle_seed=(optim.seed + epoch) if config.data.shuffle_buffer else None,
        )
        first_batch_s = 0.0
        for batch in lockstep(batches, device):
            if steps == 0:
                first_batch_s = time.perf_counter() - started  # pipeline start-up of this epoch
            bad = ~batch["ok"]
            if bad.any():
                totals[3] += int(bad.sum())
                reasons += [f"{uri}: {error}" for uri, error in zip(batch["image_uri"][bad], batch["error"][bad])]
            regions, masks, noun_ids = batch_tensors(batch, noun_index)
            result = trainer.step(regions, masks, noun_ids)
            totals[0] += result.loss * result.count
            totals[1] += result.correct
            totals[2] += result.count
            steps += 1
            if steps == 1:
                maybe_crash(directory, "epoch", fault.crash_at_epoch, fault.crash_rank, epoch, rank,
                            session.wait_for_checkpoints)
            if rank == 0 and config.run.log_every_steps and steps % config.run.log_every_steps == 0:
                logger.info("epoch %d/%d step %d/%d: loss %.4f lr %.3g", epoch, optim.epochs, steps,
                            steps_per_epoch, result.loss, trainer.lr)
        for reason in reasons[:5]:
            logger.warning("[rank %d] skipped pair: %s", rank, reason)
        if world > 1:
            dist.all_reduce(totals)
        seconds = time.perf_counter() - started
        count = max(1.0, float(totals[2]))
        metrics = {
            "epoch": epoch, "loss": float(totals[0]) / count, "accuracy": float(totals[1]) / count,
            "samples_per_s": float(totals[2]) / seconds, "pairs": int(totals[2]),
            "skipped_pairs": int(totals[3]), "steps": steps, "lr": trainer.lr, "epoch_s": seconds,
            "first_batch_s": first_batch_s,
        }
        history.append(metrics)
        if rank == 0:
            logger.info("epoch %d/%d: loss %.4f accuracy %.3f, %.1f samples/s, %d pairs (%d skipped), lr %.3g, %.1fs",
                        epoch, optim.epochs, metrics["loss"], metrics["accuracy"], metrics["samples_per_s"],
                        metrics["pairs"], metrics["skipped_pairs"], metrics["lr"], seconds)
        if metrics["pairs"] == 0:  # every pair skipped (all ranks agree after the all-reduce): stop untrained
            if rank == 0:
                storage.write_text(storage.join(directory, STOPPED_FILE),
                                   json.dumps({**metrics, "skip_reasons": reasons[:3]}))
            return
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            if rank == 0:
                save_training_checkpoint(checkpoint_dir, trainer,
                                         {"epoch": epoch, "history": history, "resumed_after": resumed_after})
            session.report(metrics, checkpoint_dir if rank == 0 else None, f"epoch-{epoch:04d}")

    if rank == 0:
        _write_final(config, model, directory, history, resumed_after, vocabulary, loop_config["rows"])


def _write_final(config: TrainClipConfig, model, directory: str, history: list[dict], resumed_after: list[int],
                 vocabulary: list[str], rows: int) -> None:
    final_dir = storage.join(directory, FINAL_DIR)
    metadata = {"mode": config.mode, "objective": config.objective, "epochs": str(config.optim.epochs),
                "preset": config.model.preset, "init_weights": config.model.init_weights or "",
                "pairs": config.data.source(), "run": directory}
    outputs = export_model(model, final_dir, metadata)
    summary = {
        "run": directory, "mode": config.mode, "objective": config.objective, "epochs": config.optim.epochs,
        "pairs": rows, "vocabulary_size": len(vocabulary), "clip_arch": model.config.clip_arch,
        "prompt_depth": model.config.prompt_depth, "history": history, "resumed_after": resumed_after,
        "outputs": outputs,
        "config": config.model_dump(mode="json"),
    }
    storage.write_text(storage.join(final_dir, SUMMARY_FILE), json.dumps(summary, indent=2))
    logger.info("wrote %s, %s and %s", outputs["model"], outputs["open_clip_model"], outputs["mask_prompts"])
