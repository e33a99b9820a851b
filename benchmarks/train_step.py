"""Training throughput: the Ray Train loop vs a plain single-process PyTorch loop, same run.

    python benchmarks/train_step.py [--mode ft] [--batch-size 16] [--epochs 3] [--workers 1]

Both loops train the same model (``--preset``, default tiny) in the same mode on the same pairs
(ground-truth pairs of a generated synthetic dataset, repeated ``--repeat`` times) with the same
per-worker batch, through the same ``decode_pairs`` and ``RegionTrainer.step``:

* plain: one process, decodes each batch itself, then steps (torch threads = ``--cpus-per-worker``,
  what one Ray Train worker gets);
* Ray: ``train_clip`` (Ray Data decodes in parallel tasks and streams to the DDP workers).

The first epoch of each is warm-up; samples/s is measured over the remaining epochs. Prints both
figures and the ratio Ray / plain (> 1: Ray is faster). Only ratios from the same run compare.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time

import numpy as np


def plain_loop(table, args, vocabulary: list[str]) -> dict:
    import torch

    from ovseg_ray.models.text import TEMPLATE_SETS, TextEmbedder
    from ovseg_ray.training.clip_steps import RegionTrainer, build_training_model
    from ovseg_ray.training.pair_batches import batch_tensors, decode_pairs, region_size

    torch.set_num_threads(max(1, int(args.cpus_per_worker)))
    model = build_training_model(args.preset, seed=args.seed)
    templates = TEMPLATE_SETS[args.templates]
    embeddings = TextEmbedder(model.clip, model.tokenizer, templates)(vocabulary)
    index = {noun: i for i, noun in enumerate(vocabulary)}
    steps_per_epoch = int(np.ceil(table.num_rows / args.batch_size))
    trainer = RegionTrainer(model, args.mode, embeddings, objective=args.objective, lr=args.lr,
                            total_steps=steps_per_epoch * args.epochs)
    size = region_size(model.config)
    rng = np.random.default_rng(args.seed)
    columns = {name: np.array(table.column(name).to_pylist(), dtype=object)
               for name in ("image_uri", "noun", "rle_counts", "rle_size")}
    epochs = []
    for epoch in range(args.epochs):
        order = rng.permutation(table.num_rows)
        started, step_time, samples = time.perf_counter(), 0.0, 0
        for begin in range(0, len(order), args.batch_size):
            rows = order[begin:begin + args.batch_size]
            batch = decode_pairs({k: v[rows] for k, v in columns.items()}, size=size,
                                 interpolation=model.config.region_interpolation)
            regions, masks, ids = batch_tensors(batch, index)
            tick = time.perf_counter()
            result = trainer.step(regions, masks, ids)
            step_time += time.perf_counter() - tick
            samples += result.count
        epochs.append({"samples": samples, "seconds": time.perf_counter() - started, "step_seconds": step_time,
                       "loss": result.loss})
    measured = epochs[1:] or epochs
    samples = sum(e["samples"] for e in measured)
    return {"samples_per_s": samples / sum(e["seconds"] for e in measured),
            "step_samples_per_s": samples / sum(e["step_seconds"] for e in measured),
            "losses": [e["loss"] for e in epochs]}


def ray_loop(pairs_path: str, storage_path: str, args) -> dict:
    from ovseg_ray.config import load_config
    from ovseg_ray.training.clip_config import TrainClipConfig
    from ovseg_ray.training.engine import train_clip

    config = load_config(TrainClipConfig, None, {
        "mode": args.mode, "objective": args.objective, "text_templates": args.templates,
        "model.preset": args.preset, "data.pairs": pairs_path, "data.preprocess_cpus": args.preprocess_cpus,
        "optim.epochs": args.epochs, "optim.batch_size": args.batch_size, "optim.lr": args.lr,
        "optim.seed": args.seed, "run.storage_path": storage_path, "run.name": f"bench-{os.getpid()}",
        "run.num_workers": args.workers, "run.cpus_per_worker": args.cpus_per_worker, "run.log_every_steps": 0,
        "run.use_gpu": args.use_gpu,
    })
    started = time.perf_counter()
    quiet = contextlib.redirect_stdout(io.StringIO()) if not args.verbose else contextlib.nullcontext()
    with quiet:
        summary = train_clip(config)
    wall = time.perf_counter() - started
    history = summary["history"]
    measured = history[1:] or history
    samples = sum(h["pairs"] for h in measured)
    seconds = sum(h["epoch_s"] for h in measured)
    startup = sum(h["first_batch_s"] for h in measured)
    return {"samples_per_s": samples / seconds, "streaming_samples_per_s": samples / (seconds - startup),
            "startup_s": startup / len(measured), "wall_s": wall, "losses": [h["loss"] for h in history]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--mode", default="ft", choices=("ft", "mpt"))
    parser.add_argument("--objective", default="clip", choices=("clip", "vocab"))
    parser.add_argument("--templates", default="vild", choices=("vild", "bare"))
    parser.add_argument("--images", type=int, default=24, help="synthetic images (about 2 pairs each)")
    parser.add_argument("--repeat", type=int, default=16, help="repeat the pairs table this many times")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per worker per step")
    parser.add_argument("--epochs", type=int, default=3, help="the first one is warm-up")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    parser.add_argument("--cpus-per-worker", type=float, default=None,
                        help="CPUs per Ray Train worker (default: the machine's CPUs minus the decoding "
                             "task's, shared by the workers, at most 1)")
    parser.add_argument("--preprocess-cpus", type=float, default=0.5)
    parser.add_argument("--use-gpu", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="show the Ray run's own output")
    args = parser.parse_args(argv)
    if args.cpus_per_worker is None:
        args.cpus_per_worker = min(1.0, ((os.cpu_count() or 2) - args.preprocess_cpus) / args.workers)

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ovseg_ray.data.synth import generate_dataset
    from ovseg_ray.raycluster import init_ray
    from ovseg_ray.training.pair_batches import coco_instance_pairs

    with tempfile.TemporaryDirectory(prefix="train-step-bench-") as tmp:
        generate_dataset(os.path.join(tmp, "data"), images=args.images, seed=args.seed, eval_images=2)
        table = pa.concat_tables([coco_instance_pairs(os.path.join(tmp, "data"))] * args.repeat)
        pairs_path = os.path.join(tmp, "pairs.parquet")
        pq.write_table(table, pairs_path)
        vocabulary = sorted(set(table.column("noun").to_pylist()))
        print(f"{table.num_rows} pairs, {len(vocabulary)} nouns, preset {args.preset}, mode {args.mode}, "
              f"batch {args.batch_size} per worker, {args.epochs} epochs (first is warm-up)", flush=True)

        plain = plain_loop(table, args, vocabulary)
        print(f"plain PyTorch loop (1 process, {max(1, int(args.cpus_per_worker))} thread(s)): "
              f"{plain['samples_per_s']:.1f} samples/s (train step alone {plain['step_samples_per_s']:.1f})",
              flush=True)
        if not args.verbose and not os.environ.get("RAY_ADDRESS"):
            import ray

            ray.init(include_dashboard=False, log_to_driver=False)
        init_ray()
        ray_result = ray_loop(pairs_path, os.path.join(tmp, "runs"), args)
        print(f"Ray Train loop ({args.workers} worker(s), Ray Data decoding): "
              f"{ray_result['samples_per_s']:.1f} samples/s per epoch; "
              f"{ray_result['streaming_samples_per_s']:.1f} samples/s once the first batch arrived "
              f"({ray_result['startup_s']:.1f}s pipeline start per epoch; {ray_result['wall_s']:.1f}s for the "
              f"whole fit)", flush=True)
        print(f"ratio Ray / plain: {ray_result['samples_per_s'] / plain['samples_per_s']:.2f} per epoch, "
              f"{ray_result['streaming_samples_per_s'] / plain['samples_per_s']:.2f} once streaming")
        print(f"losses per epoch: plain {[round(v, 3) for v in plain['losses']]}, "
              f"Ray {[round(v, 3) for v in ray_result['losses']]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
