"""``ovseg-ray convert SRC DST``: write a safetensors checkpoint of this package's layout.

SRC (path or s3://) may be an OVSeg release checkpoint (ovseg_R101c_vitB16_ft_mpt.pth,
ovseg_swinbase_vitL14_ft_mpt.pth, ovseg_swinbase_vitL14_mpt_only.pt; preset recognised from its keys),
one of our checkpoints, or a CLIP alone: OpenAI's ViT-B-16.pt / ViT-L-14.pt (TorchScript or state
dict; the TorchScript code is never run, only its tensor records are read) or an OpenCLIP
checkpoint, optionally with OVSeg's visual.mask_embedding. A CLIP alone needs --preset and gives a
CLIP-only file; --clip-weights CLIP merges a CLIP into a whole model instead.

Use the result with `ovseg-ray segment --preset P --weights DST`.
"""

from __future__ import annotations

import argparse

from ..weights.convert import DTYPES


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert OVSeg release / OpenAI / OpenCLIP weights to this package's safetensors",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SRC", help="checkpoint to convert (path or s3:// URI)")
    parser.add_argument("destination", metavar="DST", help="output *.safetensors (path or s3:// URI)")
    parser.add_argument("--preset", default=None,
                        help="target preset (tiny, r101c-vitb16, swinb-vitl14); needed for CLIP-only sources, "
                             "recognised from the keys of release checkpoints")
    parser.add_argument("--clip-weights", default=None, metavar="CLIP",
                        help="CLIP-only checkpoint whose CLIP (and mask prompts, if any) replace SRC's")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="stored float type (default float32)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow a full unpickle of SRC when weights_only loading refuses it: this can run "
                             "arbitrary code from the file, so use it only for files from a source you trust")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..weights.convert import convert_checkpoint

    if args.trust_pickle:
        print("warning: --trust-pickle: a file that weights_only loading refuses will be fully unpickled, "
              "which runs whatever code it contains")
    report = convert_checkpoint(args.source, args.destination, preset=args.preset, clip_weights=args.clip_weights,
                                dtype=args.dtype, trust_pickle=args.trust_pickle, say=print)
    for key, reason in sorted(report.not_loaded.items()):
        print(f"  left out {key}: {reason}")
    print(report.summary())
    return 0
