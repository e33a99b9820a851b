"""The embedded default, end to end on one local Ray: the whole OVSeg loop with the shipped tiny model.

    python jobs/demo.py --out runs/demo

The ``tiny`` preset ships weights trained by the small-scale reproduction (``ovseg-ray reproduce``,
world seed 0; ``ovseg_ray/models/weights/tiny.md``). The demo generates a *fresh* instance of the same
synthetic open world (another seed: none of its scenes was ever trained on) and runs:

1. ``synth --world open``: training images with COCO captions, and a held-out split in the ADE20K layout;
2. ``eval``: zero-shot mIoU of the shipped model on the held-out split, all 72 classes, seen and unseen
   apart (Ray Data) -- the headline figure, printed at the end;
3. ``mine``: (masked region, noun) pairs from the captions with the shipped MaskFormer and CLIP (Ray Data);
4. ``train-clip``: one short FT epoch of the shipped CLIP on those pairs (Ray Train, 2 workers);
5. ``segment``: label PNG, overlay and JSON of a few held-out images with the shipped weights.

Every step is the command a user runs on a cluster, with the same configs; here they share one local Ray.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

from ovseg_ray.cli import main as cli
from ovseg_ray.data.world import SEEN


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    parser.add_argument("--images", type=int, default=24, help="training images of the generated world")
    parser.add_argument("--eval-images", type=int, default=40, help="held-out images scored by eval")
    parser.add_argument("--seed", type=int, default=7, help="world seed (the shipped model was trained on 0)")
    args = parser.parse_args(argv)

    out = os.path.abspath(args.out)
    world, pairs, runs = (os.path.join(out, name) for name in ("world", "pairs", "train"))
    classes = os.path.join(world, "classes", "all.json")
    benchmark = {"name": "open-world", "classes": classes, "images": "eval/images", "labels": "eval/labels",
                 "seen_classes": list(SEEN)}
    eval_config = os.path.join(out, "eval.yaml")
    os.makedirs(out, exist_ok=True)
    with open(eval_config, "w") as handle:  # JSON is YAML
        json.dump({"benchmarks": [], "custom_benchmarks": [benchmark], "dataset_root": world,
                   "out": os.path.join(out, "eval"), "name": "tiny (shipped weights)",
                   "compute": {"num_cpus": 1.0, "batch_size": 8}}, handle)
    steps = [
        ("synth", ["synth", "--world", "open", "--out", world, "--images", str(args.images), "--eval-images",
                   str(args.eval_images), "--seed", str(args.seed)]),
        ("eval", ["eval", "--config", eval_config]),
        ("mine", ["mine", "--images", os.path.join(world, "train", "images"),
                  "--captions", os.path.join(world, "train", "annotations", "captions.json"), "--output", pairs,
                  "--shard-size", "8"]),
        ("train-clip", ["train-clip", "--mode", "ft", "--data.pairs", os.path.join(pairs, "pairs"),
                        "--model.init-weights", "default", "--optim.epochs", "1", "--optim.batch-size", "8",
                        "--optim.lr", "1e-5", "--run.storage-path", runs, "--run.name", "ft",
                        "--run.num-workers", "2", "--run.cpus-per-worker", "0.5", "--data.preprocess-cpus", "0.5"]),
    ]
    started = time.perf_counter()
    for name, command in steps:
        print(f"\n=== demo step: {name} ===", flush=True)
        status = cli(command)
        if status:
            print(f"demo stopped: step {name} failed with status {status}", file=sys.stderr)
            return status
    images = sorted(glob.glob(os.path.join(world, "eval", "images", "*.jpg")))[:4]
    print("\n=== demo step: segment ===", flush=True)
    status = cli(["segment", *images, "--classes-file", classes, "--out", os.path.join(out, "segment")])
    if status:
        return status
    with open(os.path.join(out, "eval", "results.json")) as handle:
        metrics = json.load(handle)["benchmarks"]["open-world"]["metrics"]
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s: the shipped tiny model on {args.eval_images} "
          f"held-out images of world seed {args.seed}: mIoU {metrics['mIoU']:.1f} (seen {metrics['mIoU_seen']:.1f}, "
          f"unseen {metrics['mIoU_unseen']:.1f}; chance {100 / 72:.1f}); pairs {pairs}, fine-tuned model "
          f"{runs}/ft/final, segmentations {out}/segment")
    return 0


if __name__ == "__main__":
    sys.exit(main())
