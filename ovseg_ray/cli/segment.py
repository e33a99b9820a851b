"""``ovseg-ray segment``: segment image files with any vocabulary and write label PNG, overlay, JSON."""

from __future__ import annotations

import argparse
import os
import time

from .common import add_model_arguments, read_class_names, refuse_relative_paths_in_job


def register(subparsers) -> None:
    parser = subparsers.add_parser("segment", help="segment images with an open vocabulary", description=__doc__)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image paths or s3:// URIs")
    add_model_arguments(parser)
    parser.add_argument("--out", default="runs/segment", help="output folder or s3:// prefix (default runs/segment)")
    parser.add_argument("--lambda", dest="lam", type=float, default=None,
                        help="CLIP weight in the ensemble: 0 = MaskFormer only, 1 = CLIP only (preset default 0.7)")
    parser.add_argument("--mask-threshold", type=float, default=None,
                        help="proposal binarisation threshold (default: the preset's; 0.35 in demo mode)")
    parser.add_argument("--mode", choices=("eval", "demo"), default="eval",
                        help="eval: the official evaluation inference (default); demo: the official demo's "
                             "(CLIP-only classes, each class's best proposal, uncovered pixels unlabelled)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Every input gets its outputs or one ``error:`` line (unreadable, a folder, a name another input
    already took); the run goes on and exits 1 if any failed."""
    from ..data import storage
    from ..data.images import load_image
    from ..inference import Segmenter, inference_settings, vocabulary
    from ..models.ovseg import build_model, load_preset
    from ..models.text import distinct_class_names
    from ..outputs import claim_stems, write_segmentation

    classes = read_class_names(args.classes, args.classes_file)
    distinct_class_names(vocabulary(classes, args.mode))  # demo mode may append "others"
    storage.check_output_folder(args.out)
    refuse_relative_paths_in_job({"--out": args.out})
    config = load_preset(args.preset)
    inference_settings(config, args.mode, args.lam, args.mask_threshold)  # refuse bad settings before loading
    inputs, clashes = claim_stems((uri, os.path.splitext(os.path.basename(uri.rstrip("/")))[0]) for uri in args.images)
    for uri, _, reason in clashes:
        print(f"error: {uri}: {reason}")
    model = build_model(config, weights=args.weights, clip_weights=args.clip_weights, device=args.device)
    segmenter = Segmenter(model)
    failures = len(clashes)
    for uri, stem in inputs:
        start = time.perf_counter()
        try:
            image = load_image(uri)
        except storage.StorageUnreachableError:
            raise  # every input would fail the same way
        except (OSError, ValueError) as exc:  # missing, a folder, unreadable, undecodable
            print(f"error: {exc}")
            failures += 1
            continue
        result = segmenter.segment(image, classes, lam=args.lam, mask_threshold=args.mask_threshold, mode=args.mode)
        paths = write_segmentation(args.out, stem, image, result)
        present = sorted(((f, c) for c, f in result.pixel_fractions().items() if f > 0), reverse=True)
        top = ", ".join(f"{c} {f:.0%}" for f, c in present[:5])
        print(f"{uri}: {image.shape[1]}x{image.shape[0]} -> {paths['label_png']} "
              f"({time.perf_counter() - start:.2f}s; {top})")
    print(f"segmented {len(args.images) - failures} of {len(args.images)} images into {args.out}"
          + (f"; {failures} failed (the error lines above)" if failures else ""))
    return 1 if failures else 0
