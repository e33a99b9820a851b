"""Ray Train engine for adapting the masked CLIP to mined pairs (thin wiring of ``train_clip``).

Pairs Parquet (local or s3://) -> Ray Data (``decode_pairs``: masked, cropped, resized regions) ->
Ray Train ``TorchTrainer`` (DDP, gloo on CPU, NCCL on GPU; one shard per worker) -> a checkpoint
per epoch under ``STORAGE/NAME`` and, when done, ``STORAGE/NAME/final/`` (see
``train_clip.export_model``). Re-running the same command resumes from the latest checkpoint; a
finished run is reported and not started again.

The pair rows (URIs and RLE text, small) are read once into Ray's object store; regions are decoded
every epoch by Ray Data tasks (``data.cache_regions`` keeps them instead, for small tables). On a
multi-node cluster ``run.storage_path`` must be shared storage (s3:// or a shared mount), as Ray
Train requires: rank 0 writes ``final/`` there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from ..config import ConfigError
from ..data import storage
from .clip_steps import (
    SUMMARY_FILE,
    build_training_model,
    export_model,
    load_training_checkpoint,
    model_config,
    optimizer_settings,
    save_training_checkpoint,
)
from .config import (
    FAULT_DIR,
    FINAL_DIR,
    TrainClipConfig,
    check_run_record,
    check_start_weights,
    finished_summary,
    pair_files,
    run_dir,
)
from .pair_batches import REQUIRED_PAIR_COLUMNS, batch_tensors, decode_pairs, noun_problem, region_size

logger = logging.getLogger(__name__)
STOPPED_FILE = "stopped.json"  # an epoch without any usable pair: why the run stopped untrained


def _resolve_use_gpu(config: TrainClipConfig) -> bool:
    from ..raycluster import resolve_num_gpus

    requested = config.run.use_gpu
    use_gpu = resolve_num_gpus("auto" if requested == "auto" else (1 if requested else 0)) > 0
    if not use_gpu and config.optim.precision in ("bf16", "fp16"):
        raise ConfigError(f"optim.precision {config.optim.precision} needs GPU workers; "
                          f"use auto or fp32 on a CPU cluster")
    return use_gpu


def _check_cpu_budget(config: TrainClipConfig, use_gpu: bool) -> None:
    """Training workers plus one decoding task must fit a fixed cluster, or the run would wait forever."""
    from ..raycluster import check_capacity

    workers = config.run.num_workers * config.run.cpus_per_worker
    what = (f"{config.run.num_workers} workers x run.cpus_per_worker {config.run.cpus_per_worker:g}"
            f"{' (1 GPU each)' if use_gpu else ''} + data.preprocess_cpus {config.data.preprocess_cpus:g}")
    try:
        check_capacity(workers + config.data.preprocess_cpus, config.run.num_workers if use_gpu else 0, what,
                       "Ray Data could never decode a batch; lower run.cpus_per_worker or data.preprocess_cpus, "
                       "or use fewer workers")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _filesystem(uri: str):
    """A pyarrow filesystem (through fsspec, so S3 settings match ``ovseg_ray.data.storage``) and path."""
    if not storage.is_remote(uri):
        return None, os.path.abspath(uri)
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = storage.filesystem(uri)
    return PyFileSystem(FSSpecHandler(fs)), path


def load_pairs(config: TrainClipConfig):
    """The pairs as a Ray Dataset of decoded regions, their row count and the sorted vocabulary."""
    import ray.data

    uri = config.data.pairs
    if not storage.exists(uri):
        raise FileNotFoundError(f"pairs not found: {uri}")
    files = pair_files(uri)
    filesystem = _filesystem(files[0])[0]
    ds = ray.data.read_parquet([_filesystem(f)[1] for f in files], filesystem=filesystem)
    missing = [c for c in REQUIRED_PAIR_COLUMNS if c not in ds.schema().names]
    if missing:
        raise ValueError(f"the pairs table {uri} lacks the column(s) {', '.join(missing)} "
                         f"(needed: {', '.join(REQUIRED_PAIR_COLUMNS)}; see ovseg_ray.data.pairs.PAIR_SCHEMA)")
    # The pair rows are small (RLE text): read them once, not again every epoch; regions are
    # decoded per epoch (or once, with cache_regions).
    ds = ds.select_columns(list(REQUIRED_PAIR_COLUMNS)).materialize()
    rows = ds.count()
    if rows == 0:
        raise ValueError(f"the pairs table {uri} has no rows")
    nouns = {str(n).strip() for n in ds.unique("noun") if n is not None}
    vocabulary = sorted(n for n in nouns if noun_problem(n) is None)  # others: skipped rows
    if not vocabulary:
        raise ValueError(f"the pairs table {uri} has no non-empty nouns")
    model = model_config(config.model.preset, config.model.prompt_depth)
    # Mined pairs come sorted by image: visit their blocks in a new order every epoch (unseeded, so
    # each execution of the dataset reshuffles), on top of each worker's local shuffle buffer.
    ds = ds.randomize_block_order().map_batches(
        decode_pairs,
        fn_kwargs={"size": region_size(model), "interpolation": model.region_interpolation},
        batch_size=config.data.preprocess_batch_rows,
        batch_format="numpy",
        num_cpus=config.data.preprocess_cpus,
    )
    if config.data.cache_regions:
        ds = ds.materialize()
    return ds, rows, vocabulary


def train_clip(config: TrainClipConfig) -> dict:
    """Run (or resume, or report the finished) training; returns the run summary.

    Ray must be initialised (``ovseg_ray.raycluster.init_ray``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    directory = run_dir(config)
    done = finished_summary(config)
    if done is not None:
        print(f"run {directory} already finished ({done['epochs']} epochs); outputs in {done['outputs']['model']}")
        return {**done, "already_finished": True}
    check_start_weights(config)
    fault = config.fault_injection
    if fault.crash_at_epoch is not None and fault.crash_rank >= config.run.num_workers:
        raise ConfigError(f"fault_injection.crash_rank {fault.crash_rank} does not exist with "
                          f"{config.run.num_workers} workers")
    use_gpu = _resolve_use_gpu(config)
    _check_cpu_budget(config, use_gpu)
    ds, rows, vocabulary = load_pairs(config)
    check_run_record(config, directory)
    lr, wd = optimizer_settings(config.mode, config.optim.lr, config.optim.weight_decay)
    print(f"train-clip {config.mode} ({config.objective}) on {rows} pairs, {len(vocabulary)} nouns, "
          f"{config.run.num_workers} worker(s) on {'GPU' if use_gpu else 'CPU'}, lr {lr:g}, weight decay {wd:g}; "
          f"run folder {directory}")

    filesystem, storage_path = _filesystem(config.run.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "vocabulary": vocabulary,
                           "rows": rows, "run_dir": directory},
        scaling_config=ScalingConfig(num_workers=config.run.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.run.cpus_per_worker}),
        run_config=RunConfig(
            name=config.run.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=config.run.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=config.run.max_failures),
        ),
        datasets={"train": ds},
    )
    stopped = storage.join(directory, STOPPED_FILE)  # written by rank 0 when no pair of an epoch could be used
    if storage.exists(stopped):
        storage.remove_files([stopped])
    result = trainer.fit()
    if storage.exists(stopped):
        last = json.loads(storage.read_bytes(stopped))
        reasons = "; ".join(last["skip_reasons"]) or "no reason recorded"
        raise ValueError(f"training stopped in epoch {last['epoch']}: all {last['skipped_pairs']} pairs were skipped, "
                         f"none could be used (first reasons: {reasons}); no model was written")
    summary_path = storage.join(directory, FINAL_DIR, SUMMARY_FILE)
    if not storage.exists(summary_path):
        raise RuntimeError(f"training ended without writing {summary_path} (last checkpoint: {result.checkpoint})")
    summary = json.loads(storage.read_bytes(summary_path))
    last = summary["history"][-1] if summary["history"] else {}
    print(f"train-clip finished: {summary['epochs']} epochs, loss {last.get('loss', float('nan')):.4f}, "
          f"accuracy {last.get('accuracy', float('nan')):.3f}; model {summary['outputs']['model']}")
    return {**summary, "already_finished": False}


# ----------------------------------------------------------------------------------------------
# The per-worker training loop
# ----------------------------------------------------------------------------------------------

def _lockstep(iterator, device):
    """Yield batches while every rank still has one, so collectives always pair up across ranks."""
    import torch
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    iterator = iter(iterator)
    while True:
        batch = next(iterator, None)
        if distributed:
            flag = torch.tensor([0 if batch is None else 1], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if int(flag) == 0:
                return
        elif batch is None:
            return
        yield batch


def _maybe_crash(config: TrainClipConfig, directory: str, epoch: int, rank: int) -> None:
    fault = config.fault_injection
    if fault.crash_at_epoch != epoch or fault.crash_rank != rank:
        return
    marker = storage.join(directory, FAULT_DIR, f"epoch-{epoch}-rank-{rank}")
    if storage.exists(marker):
        return
    import ray.train

    # Die only once Ray Train has committed every checkpoint reported so far, so that the retry
    # deterministically resumes from the previous epoch (a report still in flight when a worker
    # dies is dropped, and the retry would start from an older checkpoint).
    ray.train.get_all_reported_checkpoints(timeout_s=120)
    storage.write_text(marker, f"injected crash at epoch {epoch} on rank {rank}, {time.ctime()}\n")
    logger.warning("[rank %d] fault injection: exiting abruptly in epoch %d", rank, epoch)
    os._exit(1)


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from ..models.text import TEMPLATE_SETS, TextEmbedder
    from .clip_steps import RegionTrainer

    logging.getLogger("ovseg_ray").setLevel(logging.INFO)  # progress lines reach Ray's worker log and driver
    config = TrainClipConfig.model_validate(loop_config["config"])
    vocabulary: list[str] = loop_config["vocabulary"]
    directory: str = loop_config["run_dir"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    optim = config.optim
    torch.manual_seed(optim.seed)

    model = build_training_model(config.model.preset, config.model.init_weights, config.model.clip_weights,
                                 config.model.prompt_depth, seed=optim.seed)
    model.clip.to(device)
    model.region_encoder.to(device)
    text = TextEmbedder(model.clip, model.tokenizer, TEMPLATE_SETS[config.text_templates], cache_size=len(vocabulary) + 1)
    vocabulary_embeddings = text(vocabulary)
    noun_index = {noun: index for index, noun in enumerate(vocabulary)}
    steps_per_epoch = max(1, math.ceil((loop_config["rows"] // world) / optim.batch_size))
    trainer = RegionTrainer(
        model, config.mode, vocabulary_embeddings, objective=config.objective, lr=optim.lr,
        weight_decay=optim.weight_decay, warmup_steps=optim.warmup_steps,
        total_steps=steps_per_epoch * optim.epochs, logit_scale=optim.logit_scale, precision=optim.precision,
        grad_clip_norm=optim.grad_clip_norm, gather_negatives=optim.gather_negatives,
        wrap=lambda module: ray.train.torch.prepare_model(module, move_to_device=device),
    )

    history: list[dict] = []
    resumed_after: list[int] = []  # the epoch of the checkpoint each restart (retry or re-run) began from
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as checkpoint_dir:
            progress = load_training_checkpoint(checkpoint_dir, trainer)
        start_epoch, history = int(progress["epoch"]), list(progress["history"])
        resumed_after = [*progress.get("resumed_after", []), start_epoch]
        if rank == 0:
            logger.info("resuming %s from its checkpoint after epoch %d of %d", config.run.name, start_epoch,
                        optim.epochs)

    shard = ray.train.get_dataset_shard("train")
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
        for batch in _lockstep(batches, device):
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
            _maybe_crash(config, directory, epoch, rank)
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
                storage.write_text(storage.join(directory, STOPPED_FILE), json.dumps({**metrics, "skip_reasons": reasons[:3]}))
            return
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            reported = None
            if rank == 0:
                save_training_checkpoint(checkpoint_dir, trainer,
                                         {"epoch": epoch, "history": history, "resumed_after": resumed_after})
                reported = ray.train.Checkpoint.from_directory(checkpoint_dir)
            ray.train.report(metrics, checkpoint=reported, checkpoint_dir_name=f"epoch-{epoch:04d}")

    if rank == 0:
        _write_final(config, model, directory, history, resumed_after, vocabulary, loop_config["rows"])


def _write_final(config: TrainClipConfig, model, directory: str, history: list[dict], resumed_after: list[int],
                 vocabulary: list[str], rows: int) -> None:
    final_dir = storage.join(directory, FINAL_DIR)
    metadata = {"mode": config.mode, "objective": config.objective, "epochs": str(config.optim.epochs),
                "preset": config.model.preset, "init_weights": config.model.init_weights or "",
                "pairs": config.data.pairs, "run": directory}
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
