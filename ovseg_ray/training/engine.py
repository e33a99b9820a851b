"""The training package's Ray module: Ray Data feeds the per-worker loops, Ray Train runs them.

``train-clip``: pairs Parquet (local or s3://) -> Ray Data (``decode_pairs``: masked, cropped, resized
regions) -> the loop of ``clip_loop.py``. ``train-maskformer``: images + label PNGs -> Ray Data
(``maskformer_data.load_batch``: decoded, checked, augmented crops) -> the loop of
``maskformer_loop.py``. Both: ``TorchTrainer`` (DDP, gloo on CPU, NCCL on GPU; one shard per worker),
checkpoints under ``STORAGE/NAME`` (local or s3://), ``FailureConfig`` retries from the last one, a
re-run of the same command resumes, a finished run is reported and not started again. The loops see
Ray only through :class:`RaySession`.

On a multi-node cluster ``run.storage_path`` must be shared storage (s3:// or a shared mount), as Ray
Train requires: rank 0 writes ``final/`` there.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from contextlib import contextmanager

from ..config import ConfigError
from ..data import storage
from ..data.pair_store import pair_files
from .clip_config import TrainClipConfig, check_run_record, check_start_weights, finished_summary, run_dir
from .clip_loop import STOPPED_FILE, run_clip_training
from .clip_steps import model_config, optimizer_settings
from .maskformer_config import RUN_RECORD as MASKFORMER_RECORD
from .maskformer_config import TrainMaskFormerConfig, class_names
from .maskformer_config import run_dir as maskformer_run_dir
from .maskformer_data import list_samples, load_batch
from .maskformer_loop import run_maskformer_training
from .pair_batches import REQUIRED_PAIR_COLUMNS, coco_instance_pairs, decode_pairs, noun_problem, region_size
from .pretrain import RUN_RECORD as PRETRAIN_RECORD
from .pretrain import PretrainClipConfig, cache_size, decode_captioned
from .pretrain_loop import run_pretraining
from .runs import RunSection, read_summary
from .runs import check_run_record as check_record
from .runs import run_dir as run_path

logger = logging.getLogger(__name__)
LOOPS = {"clip": run_clip_training, "maskformer": run_maskformer_training, "pretrain": run_pretraining}


class RaySession:
    """The :class:`~ovseg_ray.training.runs.TrainSession` of a Ray Train worker."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def shard(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    @contextmanager
    def latest_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield directory

    def report(self, metrics, checkpoint_dir: str | None = None, name: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(dict(metrics), checkpoint=checkpoint, checkpoint_dir_name=name)

    def wrap(self, module):
        import ray.train.torch

        return ray.train.torch.prepare_model(module, move_to_device=self.device)

    def wait_for_checkpoints(self) -> None:
        import ray.train

        ray.train.get_all_reported_checkpoints(timeout_s=120)


def _worker_loop(loop_config: dict) -> None:
    logging.getLogger("ovseg_ray").setLevel(logging.INFO)  # progress lines reach Ray's worker log and driver
    LOOPS[loop_config["loop"]](loop_config, RaySession())


def _resolve_use_gpu(config) -> bool:
    """GPU workers or not, for a config with ``run.use_gpu`` and ``optim.precision``."""
    from ..raycluster import resolve_num_gpus

    requested = config.run.use_gpu
    use_gpu = resolve_num_gpus("auto" if requested == "auto" else (1 if requested else 0)) > 0
    if not use_gpu and config.optim.precision in ("bf16", "fp16"):
        raise ConfigError(f"optim.precision {config.optim.precision} needs GPU workers; "
                          f"use auto or fp32 on a CPU cluster")
    return use_gpu


def _check_cpu_budget(run: RunSection, preprocess_cpus: float, use_gpu: bool) -> None:
    """Training workers plus one data task must fit a fixed cluster, or the run would wait forever."""
    from ..raycluster import check_capacity

    workers = run.num_workers * run.cpus_per_worker
    what = (f"{run.num_workers} workers x run.cpus_per_worker {run.cpus_per_worker:g}"
            f"{' (1 GPU each)' if use_gpu else ''} + data.preprocess_cpus {preprocess_cpus:g}")
    try:
        check_capacity(workers + preprocess_cpus, run.num_workers if use_gpu else 0, what,
                       "Ray Data could never prepare a batch; lower run.cpus_per_worker or data.preprocess_cpus, "
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


def _fit(loop: str, loop_config: dict, run: RunSection, use_gpu: bool, datasets: dict):
    """Run ``loop`` on ``run.num_workers`` Ray Train workers; resumes from ``STORAGE/NAME``'s checkpoints."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    filesystem, storage_path = _filesystem(run.storage_path)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={**loop_config, "loop": loop},
        scaling_config=ScalingConfig(num_workers=run.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": run.cpus_per_worker}),
        run_config=RunConfig(
            name=run.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=run.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=run.max_failures),
        ),
        datasets=datasets,
    )
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        return trainer.fit()
    finally:
        # fit() installs a SIGINT handler that aborts its controller and never removes it: left there,
        # a later Ctrl-C in this process (reproduce's next step, a mining run) would only abort a
        # finished run, and the handler's reference would keep the controller actor alive.
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def _already_finished(directory: str, record: tuple, what: str) -> dict | None:
    """The summary of a finished run (its settings checked against ``record``), printed; else None."""
    done = read_summary(directory)
    if done is not None:
        check_record(*record)
        print(f"run {directory} already finished ({what.format(**done)}); outputs in {done['outputs']}")
    return done


def _finished_or_fail(directory: str, result) -> dict:
    summary = read_summary(directory)
    if summary is None:
        raise RuntimeError(f"training ended without writing {directory}/final/summary.json "
                           f"(last checkpoint: {result.checkpoint})")
    return summary


# ----------------------------------------------------------------------------------------------
# train-clip


def load_pairs(config: TrainClipConfig):
    """The pairs as a Ray Dataset of decoded regions, their row count and the sorted vocabulary."""
    import pyarrow.compute
    import pyarrow.dataset
    import ray.data

    uri = config.data.source()
    if not storage.exists(uri):
        raise FileNotFoundError(f"pairs not found: {uri}")
    if config.data.instances:  # ground-truth pairs: every instance mask with its category name
        images = config.data.instance_images
        images = images if storage.is_remote(images) else os.path.abspath(images)  # workers read these URIs
        table = coco_instance_pairs("", config.data.instances, images)
        ds = ray.data.from_arrow(table)
    else:
        files = pair_files(uri)
        filesystem, paths = _filesystem(files[0])[0], [_filesystem(f)[1] for f in files]
        ds = ray.data.read_parquet(paths, filesystem=filesystem)
        table = None
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
    # The vocabulary from the noun column alone, read here: a Ray Data aggregation would start
    # worker processes for it (about 7 s each on a small machine, for every run).
    if table is None:  # only the noun column is read
        table = pyarrow.dataset.dataset(paths, filesystem=filesystem, format="parquet").to_table(columns=["noun"])
    nouns = {str(n).strip() for n in pyarrow.compute.unique(table.column("noun")).to_pylist() if n is not None}
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
    _check_cpu_budget(config.run, config.data.preprocess_cpus, use_gpu)
    ds, rows, vocabulary = load_pairs(config)
    check_run_record(config, directory)
    lr, wd = optimizer_settings(config.mode, config.optim.lr, config.optim.weight_decay)
    print(f"train-clip {config.mode} ({config.objective}) on {rows} pairs, {len(vocabulary)} nouns, "
          f"{config.run.num_workers} worker(s) on {'GPU' if use_gpu else 'CPU'}, lr {lr:g}, weight decay {wd:g}; "
          f"run folder {directory}")
    stopped = storage.join(directory, STOPPED_FILE)  # written by rank 0 when no pair of an epoch could be used
    if storage.exists(stopped):
        storage.remove_files([stopped])
    result = _fit("clip", {"config": config.model_dump(mode="json"), "vocabulary": vocabulary, "rows": rows,
                           "run_dir": directory}, config.run, use_gpu, {"train": ds})
    if storage.exists(stopped):
        last = json.loads(storage.read_bytes(stopped))
        reasons = "; ".join(last["skip_reasons"]) or "no reason recorded"
        raise ValueError(f"training stopped in epoch {last['epoch']}: all {last['skipped_pairs']} pairs were skipped, "
                         f"none could be used (first reasons: {reasons}); no model was written")
    summary = _finished_or_fail(directory, result)
    last = summary["history"][-1] if summary["history"] else {}
    print(f"train-clip finished: {summary['epochs']} epochs, loss {last.get('loss', float('nan')):.4f}, "
          f"accuracy {last.get('accuracy', float('nan')):.3f}; model {summary['outputs']['model']}")
    return {**summary, "already_finished": False}


# ----------------------------------------------------------------------------------------------
# train-maskformer


def class_text_embeddings(config: TrainMaskFormerConfig, names: list[str]):
    """(C, E) unit text embeddings of the class names from the frozen CLIP text tower, with the
    preset's template ensemble: computed once, here, and shipped to the workers."""
    import torch

    from ..models.ovseg import build_model
    from ..models.text import TextEmbedder

    model = build_model(model_config(config.model.preset, None), clip_weights=config.model.clip_weights)
    embedder = TextEmbedder(model.clip, model.tokenizer, model.config.template_list(), cache_size=len(names) + 1)
    with torch.no_grad():
        return embedder(names).float().cpu()


def segmentation_dataset(config: TrainMaskFormerConfig, samples):
    """The training samples as a Ray Dataset of decoded, checked, augmented crops (new ones every pass
    unless ``data.augment_seed`` is set), in a new block order every pass."""
    from ..raycluster import items_dataset

    items = [{"image_uri": s.image_uri, "label_uri": s.label_uri} for s in samples]
    return items_dataset(items, config.data.preprocess_batch_rows).randomize_block_order().map_batches(
        load_batch,
        fn_kwargs={"num_classes": len(class_names(config.data.classes)), "ignore_label": config.data.ignore_label,
                   "augmentation": config.augmentation(), "seed": config.data.augment_seed},
        batch_size=config.data.preprocess_batch_rows,
        batch_format="numpy",
        num_cpus=config.data.preprocess_cpus,
    )


def train_maskformer(config: TrainMaskFormerConfig) -> dict:
    """Run (or resume, or report the finished) MaskFormer training; returns the run summary."""
    directory = maskformer_run_dir(config)
    record = (directory, MASKFORMER_RECORD, config.fingerprint(), config.model_dump(mode="json"))
    done = _already_finished(directory, record, "{steps} steps")
    if done is not None:
        return {**done, "already_finished": True}
    for field in ("init_weights", "clip_weights"):
        given = getattr(config.model, field)
        if given and not storage.exists(given):
            raise FileNotFoundError(f"model.{field} not found: {given}")
    fault = config.fault_injection
    if fault.crash_at_step is not None and fault.crash_rank >= config.run.num_workers:
        raise ConfigError(f"fault_injection.crash_rank {fault.crash_rank} does not exist with "
                          f"{config.run.num_workers} workers")
    use_gpu = _resolve_use_gpu(config)
    _check_cpu_budget(config.run, config.data.preprocess_cpus, use_gpu)
    names = class_names(config.data.classes)
    samples = list_samples(config.data.root, config.data.images, config.data.labels)[: config.data.limit]
    check_record(*record)
    settings = config.resolved()
    print(f"train-maskformer {config.model.preset}: {len(samples)} images, {len(names)} classes, "
          f"{settings.max_steps} steps of {settings.batch_size} images ({settings.crop_size}px crops) on "
          f"{config.run.num_workers} worker(s) ({'GPU' if use_gpu else 'CPU'}), lr {settings.lr:g}, weight decay "
          f"{settings.weight_decay:g}, backbone x{settings.backbone_multiplier:g}; run folder {directory}")
    text = class_text_embeddings(config, names)
    loop_config = {"config": config.model_dump(mode="json"), "text": text.tolist(), "samples": len(samples),
                   "classes": names, "run_dir": directory}
    result = _fit("maskformer", loop_config, config.run, use_gpu, {"train": segmentation_dataset(config, samples)})
    summary = _finished_or_fail(directory, result)
    last = summary["history"][-1] if summary["history"] else {}
    skipped = summary["skipped_labels"]
    print(f"train-maskformer finished: {summary['steps']} steps, loss {last.get('loss', float('nan')):.4f}; "
          f"{len(skipped)} label file(s) skipped; model {summary['outputs']['model']}")
    return {**summary, "already_finished": False}


# ----------------------------------------------------------------------------------------------
# pretrain-clip


def pretrain_clip(config: PretrainClipConfig) -> dict:
    """Run (or resume, or report the finished) image-caption pretraining; returns the run summary."""
    from ..data.coco import CocoCaptions
    from ..models.ovseg import load_preset
    from ..raycluster import items_dataset

    directory = run_path(config.run.storage_path, config.run.name)
    record = (directory, PRETRAIN_RECORD, config.fingerprint(), config.model_dump(mode="json"))
    done = _already_finished(directory, record, "{epochs} epochs")
    if done is not None:
        return {**done, "already_finished": True}
    use_gpu = _resolve_use_gpu(config)
    _check_cpu_budget(config.run, config.data.preprocess_cpus, use_gpu)
    dataset = CocoCaptions(config.data.images, config.data.captions, captions_per_image=None,
                           max_images=config.data.max_images)
    if len(dataset) < 2:
        raise ValueError(f"captions file {config.data.captions} lists {len(dataset)} image(s); pretraining needs two")
    check_record(*record)
    arch = load_preset(config.preset).clip_arch
    items = [{"image_uri": image.uri, "captions": list(image.captions)} for image in dataset.images]
    size = region_size(load_preset(config.preset))
    ds = items_dataset(items, config.data.preprocess_batch_rows).map_batches(
        decode_captioned, fn_kwargs={"arch": arch, "size": size, "max_captions": config.data.max_captions},
        batch_size=config.data.preprocess_batch_rows, batch_format="numpy", num_cpus=config.data.preprocess_cpus)
    side = cache_size(size)
    print(f"pretrain-clip {arch}: {len(items)} images, {config.optim.epochs} epochs of batches of "
          f"{config.optim.batch_size} per worker on {config.run.num_workers} worker(s) "
          f"({'GPU' if use_gpu else 'CPU'}); run folder {directory}")
    if config.data.cache_decoded:
        print(f"pretrain-clip: decoding {len(items)} images once to {side}x{side} "
              f"({len(items) * side * side * 3 / 2**20:.0f} MiB in the object store)")
        ds = ds.materialize()
    result = _fit("pretrain", {"config": config.model_dump(mode="json"), "images": len(items), "image_size": size,
                               "run_dir": directory}, config.run, use_gpu, {"train": ds.randomize_block_order()})
    summary = _finished_or_fail(directory, result)
    last = summary["history"][-1]
    print(f"pretrain-clip finished: {summary['epochs']} epochs, loss {last['loss']:.4f}, in-batch accuracy "
          f"{last['accuracy']:.3f}; CLIP {summary['outputs']['clip']}")
    return {**summary, "already_finished": False}
