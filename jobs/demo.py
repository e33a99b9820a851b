"""The embedded default, end to end on one local Ray: the whole OVSeg loop on a generated dataset.

    python jobs/demo.py --out runs/demo

1. ``synth``: a small synthetic COCO-format dataset (images, captions, an ADE20K-layout eval split);
2. ``mine``: (masked region, noun) pairs on Ray Data (proposal pool, then CLIP matching pool);
3. ``train-clip``: the masked CLIP fine-tuned on those pairs with Ray Train (2 workers, ``ft``);
4. ``eval``: zero-shot mIoU of the trained model on the ADE20K-layout split, on Ray Data;
5. ``segment``: label PNG, overlay and JSON for a few images with the trained weights.

It uses the ``tiny`` preset, whose weights start random: it exercises the whole system in a few
minutes of CPU, not accuracy (its numbers are meaningless by design). Every step is the same
command a user runs on a cluster, with the same configs; here they share one local Ray instance.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

from ovseg_ray.cli import main as cli

DEMO_CLASSES = "sky,wall,grass,water,sand,road,floor,ball,car,boat,bottle,clock,kite,star"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    parser.add_argument("--images", type=int, default=16, help="images in the generated dataset")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    out = os.path.abspath(args.out)
    data, pairs, runs = (os.path.join(out, name) for name in ("data", "pairs", "train"))
    weights = os.path.join(runs, "ft", "final", "model.safetensors")
    steps = [
        ("synth", ["synth", "--out", data, "--images", str(args.images), "--seed", str(args.seed)]),
        ("mine", ["mine", "--images", os.path.join(data, "images"),
                  "--captions", os.path.join(data, "annotations", "captions.json"), "--output", pairs,
                  "--shard-size", "4"]),
        ("train-clip", ["train-clip", "--mode", "ft", "--objective", "vocab", "--data.pairs",
                        os.path.join(pairs, "pairs"), "--optim.epochs", str(args.epochs),
                        "--optim.batch-size", "4", "--optim.lr", "1e-3", "--run.storage-path", runs,
                        "--run.name", "ft", "--run.num-workers", "2", "--run.cpus-per-worker", "0.5",
                        "--data.preprocess-cpus", "0.5"]),
        ("eval", ["eval", "--benchmarks", "ade20k_150", "--dataset-root", data, "--out",
                  os.path.join(out, "eval"), "--model.preset", "tiny", "--model.weights", weights,
                  "--compute.num-cpus", "0.5"]),
    ]
    started = time.perf_counter()
    for name, command in steps:
        print(f"\n=== demo step: {name} ===", flush=True)
        status = cli(command)
        if status:
            print(f"demo stopped: step {name} failed with status {status}", file=sys.stderr)
            return status
    images = sorted(glob.glob(os.path.join(data, "images", "*.jpg")))[:4]
    print("\n=== demo step: segment ===", flush=True)
    status = cli(["segment", *images, "--classes", DEMO_CLASSES, "--preset", "tiny", "--weights", weights,
                  "--out", os.path.join(out, "segment")])
    if status:
        return status
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s: dataset {data}, pairs {pairs}, "
          f"model {weights}, evaluation {os.path.join(out, 'eval')}, segmentations {os.path.join(out, 'segment')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
