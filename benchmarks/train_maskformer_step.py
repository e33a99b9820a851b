"""MaskFormer training throughput: the Ray Train loop vs a plain single-process PyTorch loop, same run.

    python benchmarks/train_maskformer_step.py [--preset tiny] [--batch-size 8] [--steps 80] [--crop 128]

Both train the same trainee (seeded) with ``MaskFormerTrainer.step`` on the same per-worker batch
size and the same augmentation settings (fixed per sample: ``augment_seed``):

* plain: one process; the batches are decoded and augmented once, before the clock starts, so it
  measures the training step alone (torch threads = ``--cpus-per-worker``, what the Ray worker gets);
* Ray: ``train_maskformer`` with one worker: Ray Data decodes and augments in parallel tasks and
  streams the crops to the Ray Train worker.

The Ray worker also times how long each step waits for its next batch; leaving that out gives
the step rate under Ray Train (DDP wrapper, reports, checkpoints) on batches that are ready, the
figure that compares with the plain loop on batches decoded ahead.

A second plain loop decodes and augments each batch itself, in the training process, as a loop
without a data pipeline would: the training step plus the data work that Ray Data does in its tasks.

Images/s is measured after the first quarter of the steps (warm-up: pipeline start, first
allocations): for Ray from its logged windows, for the plain loop over the same steps. Prints both
figures and the ratio Ray / plain (the issue's goal: >= 0.95). Only ratios from the same run compare.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time


def plain_loop(root: str, args, decode_inline: bool = False) -> float:
    import torch

    from ovseg_ray.data.benchmarks import read_class_names
    from ovseg_ray.models.ovseg import build_model
    from ovseg_ray.models.text import TextEmbedder
    from ovseg_ray.training.clip_steps import model_config
    from ovseg_ray.training.maskformer_data import AugmentConfig, list_samples, load_batch
    from ovseg_ray.training.maskformer_steps import MaskFormerTrainer, build_trainee

    torch.set_num_threads(max(1, int(args.cpus_per_worker)))
    names = read_class_names("coco_stuff_171")
    model = build_model(args.preset)
    text = TextEmbedder(model.clip, model.tokenizer, model.config.template_list())(names)
    samples = list_samples(root, "images", "stuffthingmaps")
    augmentation = AugmentConfig(crop_size=args.crop, short_sides=[args.crop]).model_dump()
    def decode(chunk):
        out = load_batch({"image_uri": [s.image_uri for s in chunk], "label_uri": [s.label_uri for s in chunk]},
                         len(names), 255, augmentation, seed=0)
        return torch.from_numpy(out["image"]), torch.from_numpy(out["label"])

    chunks = [samples[start:start + args.batch_size]
              for start in range(0, len(samples) - args.batch_size + 1, args.batch_size)]
    batches = None if decode_inline else [decode(chunk) for chunk in chunks]
    trainer = MaskFormerTrainer(build_trainee(model_config(args.preset, None), seed=0), text, lr=1e-3,
                                weight_decay=1e-4, max_steps=args.steps)
    warmup = args.steps // 4
    for step in range(args.steps):
        if step == warmup:
            started = time.perf_counter()
        images, labels = decode(chunks[step % len(chunks)]) if decode_inline else batches[step % len(batches)]
        trainer.step(images, labels)
    return (args.steps - warmup) * args.batch_size / (time.perf_counter() - started)


def ray_loop(root: str, storage_path: str, args) -> float:
    from ovseg_ray.config import load_config
    from ovseg_ray.training.engine import train_maskformer
    from ovseg_ray.training.maskformer_config import TrainMaskFormerConfig

    window = max(1, args.steps // 4)
    config = load_config(TrainMaskFormerConfig, None, {
        "data.root": root, "data.augment.crop_size": args.crop, "data.augment.short_sides": [args.crop],
        "data.augment_seed": 0, "data.preprocess_cpus": args.preprocess_cpus,
        **({"data.preprocess_batch_rows": args.preprocess_batch_rows} if args.preprocess_batch_rows else {}),
        "model.preset": args.preset, "optim.max_steps": args.steps, "optim.batch_size": args.batch_size,
        "optim.lr": 1e-3, "optim.warmup_steps": 0, "optim.checkpoint_every_steps": args.steps,
        "run.storage_path": storage_path, "run.name": f"bench-{os.getpid()}", "run.num_workers": 1,
        "run.cpus_per_worker": args.cpus_per_worker, "run.log_every_steps": window, "run.use_gpu": args.use_gpu,
    })
    quiet = contextlib.redirect_stdout(io.StringIO()) if not args.verbose else contextlib.nullcontext()
    with quiet:
        summary = train_maskformer(config)
    measured = summary["history"][1:]  # the first window is warm-up
    images = sum(h["images_per_s"] * h["step_s"] * window for h in measured)
    seconds = sum(h["step_s"] * window for h in measured)
    waiting = sum(h["data_s"] * window for h in measured)
    return images / seconds, images / (seconds - waiting)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--preprocess-cpus", type=float, default=0.5)
    parser.add_argument("--preprocess-batch-rows", type=int, default=None,
                        help="samples per Ray Data decoding task (default: train-maskformer's)")
    parser.add_argument("--use-gpu", default="auto")
    parser.add_argument("--verbose", action="store_true", help="show the Ray run's own output")
    args = parser.parse_args(argv)

    from ovseg_ray.data.synth import generate_dataset
    from ovseg_ray.raycluster import init_ray

    with tempfile.TemporaryDirectory(prefix="maskformer-step-bench-") as tmp:
        root = os.path.join(tmp, "data")
        generate_dataset(root, images=args.images, seed=0, eval_images=1)
        print(f"{args.images} images, preset {args.preset}, batch {args.batch_size}, {args.crop}px crops, "
              f"{args.steps} steps (first quarter warm-up)", flush=True)
        plain = plain_loop(root, args)
        print(f"plain PyTorch loop (1 process, {max(1, int(args.cpus_per_worker))} thread(s), batches decoded "
              f"ahead): {plain:.1f} images/s", flush=True)
        inline = plain_loop(root, args, decode_inline=True)
        print(f"plain PyTorch loop decoding and augmenting each batch itself: {inline:.1f} images/s", flush=True)
        if not os.environ.get("RAY_ADDRESS"):
            import ray

            ray.init(include_dashboard=False, log_to_driver=args.verbose)
        init_ray()
        ray_rate, ray_stepping = ray_loop(root, os.path.join(tmp, "runs"), args)
        print(f"Ray Train loop (1 worker, Ray Data decoding and augmenting): {ray_rate:.1f} images/s")
        print(f"Ray Train loop, its time waiting for Ray Data's next batch left out: {ray_stepping:.1f} images/s")
        print(f"ratio Ray / plain (batches decoded ahead, the issue's goal >= 0.95): {ray_rate / plain:.2f}")
        print(f"ratio Ray / plain decoding inline: {ray_rate / inline:.2f}")
        print(f"ratio Ray without its data waits / plain (batches decoded ahead; the training step's own "
              f"overhead under Ray Train): {ray_stepping / plain:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
