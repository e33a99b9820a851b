"""Does the MaskFormer's class head learn on the open world, and how fast? (issue 14's diagnosis)

    python benchmarks/maskformer_class_head.py [--steps 3000] [--images 400] [--clip 0.01] [--seed 0]

The reproduction's MaskFormer scored 0.0 seen mIoU alone (lambda 0): it painted the same few classes
on every image, its class head still at the class prior while its masks were already good. This
script trains the tiny MaskFormer from scratch on world seed ``--seed``'s seen classes in a plain PyTorch
loop (``MaskFormerTrainer.step``, the engine's step) twice in the same process, with the global
gradient norm clipped at ``--clip`` (MaskFormer's official 0.01, our default) and without clipping,
and every sixth of the run prints, on 10 held-out scenes of world seed ``--seed`` + 5: the pixel accuracy on
seen-class pixels of the project's own inference at lambda 0 over all 72 classes (the trainee's
MaskFormer loaded into the shipped model) and how many distinct classes it predicts (a head
stuck at the prior predicts the same few everywhere). Text embeddings: the shipped tiny CLIP's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np
import torch


def held_out(root: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The 10 held-out scenes: (H, W, 3) images and their label maps over every class (all.json)."""
    from ovseg_ray.data.images import decode_label_png, load_image

    scenes = []
    for k in range(1, 11):
        with open(f"{root}/eval/labels/{k:06d}.png", "rb") as handle:
            labels = decode_label_png(handle.read()).astype(np.int64)
        scenes.append((load_image(f"{root}/eval/images/{k:06d}.jpg"), labels))
    return scenes


def score(trainer, model, scenes, classes: list[str], seen: list[str]) -> tuple[float, int]:
    """The trainee's MaskFormer in the project's own inference (``Segmenter.segment``, lambda 0) over
    every class: pixel accuracy on the seen classes' pixels, and how many distinct classes it predicts."""
    from ovseg_ray.evaluation.metrics import confusion_matrix
    from ovseg_ray.inference import Segmenter

    model.load_state_dict(trainer.trainee.state_dict(), strict=False)  # maskformer.* + non_object_embedding
    model.eval()
    segmenter = Segmenter(model)
    matrix = np.zeros((len(classes), len(classes)), np.int64)
    predicted: set[int] = set()
    for image, truth in scenes:
        labels = segmenter.segment(image, classes, lam=0.0).labels
        matrix += confusion_matrix(labels, truth, len(classes))
        predicted |= set(np.unique(labels).tolist())
    rows = [classes.index(name) for name in seen]
    return float(np.trace(matrix[np.ix_(rows, rows)]) / max(matrix[rows].sum(), 1)), len(predicted)


def train(args, clip: float | None, root: str, model, text: torch.Tensor, scenes) -> list[float]:
    from ovseg_ray.data.world import CLASSES, SEEN
    from ovseg_ray.training.clip_steps import model_config
    from ovseg_ray.training.maskformer_data import AugmentConfig, list_samples, load_batch
    from ovseg_ray.training.maskformer_steps import MaskFormerTrainer, build_trainee

    samples = list_samples(f"{root}/train", "train/images", "train/labels")
    augmentation = AugmentConfig(crop_size=128, short_sides=[96, 128, 160]).model_dump()
    trainer = MaskFormerTrainer(build_trainee(model_config("tiny", None), seed=args.seed), text, lr=args.lr,
                                weight_decay=1e-4, max_steps=args.steps, warmup_steps=args.steps // 10,
                                grad_clip_norm=clip)
    rng = np.random.default_rng(args.seed)
    accuracies, ce, start = [], [], time.perf_counter()
    for step in range(1, args.steps + 1):
        chunk = [samples[i] for i in rng.choice(len(samples), args.batch_size, replace=False)]
        batch = load_batch({"image_uri": [s.image_uri for s in chunk], "label_uri": [s.label_uri for s in chunk]},
                           len(SEEN), 255, augmentation, seed=None)
        ce.append(trainer.step(torch.from_numpy(batch["image"]), torch.from_numpy(batch["label"])).terms["ce"])
        if step % max(1, args.steps // 6) == 0 or step == args.steps:
            accuracy, distinct = score(trainer, model, scenes, list(CLASSES), list(SEEN))
            accuracies.append(accuracy)
            print(f"clip {clip}: step {step}: ce {np.mean(ce):.3f}, held-out seen pixel accuracy {accuracy:.3f}, "
                  f"{distinct} distinct classes predicted on 10 scenes ({time.perf_counter() - start:.0f}s)",
                  flush=True)
            ce = []
    return accuracies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--images", type=int, default=400, help="training scenes of world seed --seed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="the tiny preset's default")
    parser.add_argument("--clip", type=float, default=0.01, help="gradient norm of the clipped run")
    parser.add_argument("--seed", type=int, default=0, help="world seed of the training scenes and training seed "
                        "(initialisation, batch order); the held-out scenes come from world seed --seed + 5")
    args = parser.parse_args(argv)

    from ovseg_ray.data.world import SEEN
    from ovseg_ray.data.world_dataset import write_world
    from ovseg_ray.models.ovseg import build_model
    from ovseg_ray.models.text import TextEmbedder

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="class-head-") as root:
        write_world(f"{root}/train", images=args.images, eval_images=1, seed=args.seed)
        write_world(f"{root}/eval", images=1, eval_images=10, seed=args.seed + 5)
        scenes = held_out(f"{root}/eval")
        model = build_model("tiny", weights="default")
        with torch.no_grad():
            text = TextEmbedder(model.clip, model.tokenizer, model.config.template_list())(list(SEEN)).float()
        clipped = train(args, args.clip, root, model, text, scenes)
        plain = train(args, None, root, model, text, scenes)
    print(f"seed {args.seed}: held-out seen pixel accuracy after {args.steps} steps: "
          f"clipped at {args.clip:g} {clipped[-1]:.3f}, "
          f"unclipped {plain[-1]:.3f} (ratio unclipped / clipped {plain[-1] / max(clipped[-1], 1e-9):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
