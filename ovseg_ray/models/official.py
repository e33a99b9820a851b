"""The official OVSeg release's inference settings, in one place (facebookresearch/ov-seg).

Where the paper is silent, the released configs and evaluation commands are the reference:

- mask threshold (``MODEL.CLIP_ADAPTER.MASK_THR``): 0.5 in ``configs/ovseg_R101c_vitB_bs32_120k.yaml``,
  0.4 in ``configs/ovseg_swinB_vitL_bs32_120k.yaml``, 0.35 in ``configs/ovseg_swinB_vitL_demo.yaml``;
- ensemble weight (``MODEL.CLIP_ADAPTER.CLIP_ENSEMBLE_WEIGHT``): 0.7 in both evaluation configs, set to
  0.6 for Pascal Context and 0.45 for Pascal VOC by the evaluation commands of ``GETTING_STARTED.md``;
- the demo (``OVSegDEMO`` with ``configs/ovseg_swinB_vitL_demo.yaml``): weight 0.0, which the official
  code treats as CLIP only.
"""

from __future__ import annotations

#: Mask threshold of each shipped preset (``tiny`` is ours: it follows the Swin-B config).
PRESET_MASK_THRESHOLDS: dict[str, float] = {"r101c-vitb16": 0.5, "swinb-vitl14": 0.4, "tiny": 0.4}

#: CLIP weight lambda of the evaluation per benchmark.
BENCHMARK_LAMBDAS: dict[str, float] = {
    "ade20k_150": 0.7,
    "ade20k_847": 0.7,
    "pascal_context_59": 0.6,
    "pascal_context_459": 0.6,
    "pascal_voc_20": 0.45,
}

#: Default lambda outside the benchmarks (both evaluation configs).
DEFAULT_LAMBDA = 0.7

#: The demo's mask threshold (its lambda is fixed: CLIP only).
DEMO_MASK_THRESHOLD = 0.35

#: Inference modes: ``eval`` is the evaluation inference (the default everywhere), ``demo`` the
#: official demo's (CLIP-only classes, each class's best query, binary masks, uncovered pixels unlabelled).
INFERENCE_MODES = ("eval", "demo")

#: MaskFormer training on COCO-Stuff-171 per preset: (lr, weight decay, backbone lr multiplier, crop),
#: from ``configs/ovseg_R101c_vitB_bs32_120k.yaml`` and the Swin-B config (both: AdamW, batch 32,
#: 120K iterations, warm-up 1500, poly schedule, gradient norm clipped at 0.01). ``tiny`` is ours:
#: a CPU-sized model trained for hundreds of steps, not thousands.
MASKFORMER_TRAINING: dict[str, tuple[float, float, float, int]] = {
    "r101c-vitb16": (2e-4, 1e-4, 0.1, 512),
    "swinb-vitl14": (6e-5, 1e-2, 1.0, 640),
    "tiny": (1e-3, 1e-4, 1.0, 128),
}
MASKFORMER_STEPS, MASKFORMER_BATCH, MASKFORMER_WARMUP = 120_000, 32, 1500
