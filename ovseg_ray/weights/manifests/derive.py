"""Derive the key manifests of the OVSeg release checkpoints from the published module definitions.

This file encodes, as plain rules, how detectron2 / MaskFormer / OVSeg / OpenAI CLIP name and shape
their parameters (see README.md beside it for the source of each rule). It deliberately imports
nothing from ``ovseg_ray.models``: the manifests are an independent statement of the release layout,
against which our modules are tested. Regenerate the JSON files with::

    python -m ovseg_ray.weights.manifests.derive
"""

from __future__ import annotations

import json
import re
from pathlib import Path

MANIFEST_DIR = Path(__file__).parent

# The numbers of configs/ovseg_R101c_vitB_bs32_120k.yaml and configs/ovseg_swinB_vitL_*.yaml in
# facebookresearch/ov-seg, plus the defaults of open_vocab_seg/config.py for what they leave unset.
RELEASES = {
    "r101c-vitb16": {
        "file": "ovseg_r101c_vitb16.json",
        "release_files": ["ovseg_R101c_vitB16_ft_mpt.pth"],
        "backbone": {"type": "r101c", "depth_blocks": [3, 4, 23, 3], "stem_out": 128, "res2_out": 256,
                     "bottleneck": 64},
        "clip": {"name": "ViT-B/16", "width": 768, "layers": 12, "patch": 16, "image": 224, "embed": 512,
                 "text_width": 512, "text_layers": 12},
    },
    "swinb-vitl14": {
        "file": "ovseg_swinb_vitl14.json",
        "release_files": ["ovseg_swinbase_vitL14_ft_mpt.pth", "ovseg_swinbase_vitL14_mpt_only.pt"],
        "backbone": {"type": "swinb", "embed_dim": 128, "depths": [2, 2, 18, 2], "heads": [4, 8, 16, 32],
                     "window": 12, "patch": 4, "mlp_ratio": 4},
        "clip": {"name": "ViT-L/14", "width": 1024, "layers": 24, "patch": 14, "image": 224, "embed": 768,
                 "text_width": 768, "text_layers": 12},
    },
}
HEAD = {"conv_dim": 256, "mask_dim": 256, "hidden_dim": 256, "num_queries": 100, "dim_feedforward": 2048,
        "dec_layers": 6, "enc_layers": 0, "pre_norm": False, "embed_hidden_dim": 1024, "embed_layers": 2,
        "num_classes": 171, "mask_prompt_depth": 3, "vocab_size": 49408, "context_length": 77}

NOT_LOADED = {
    "criterion.empty_weight": "training only: per-class weights of MaskFormer's classification loss "
                              "(num_classes + 1 entries, the last one the no-object weight)",
    "clip_adapter.pixel_mean": "constant: CLIP's mean colour x 255 as a (1, 3, 1, 1) buffer; "
                               "ovseg_ray.models.regions applies the same constants",
    "clip_adapter.pixel_std": "constant: CLIP's colour std x 255 as a (1, 3, 1, 1) buffer; "
                              "ovseg_ray.models.regions applies the same constants",
}

Shapes = dict[str, list[int]]


def _conv_norm(keys: Shapes, name: str, shape: list[int], norm: str, channels: int) -> None:
    """detectron2 ``layers.Conv2d`` with a ``norm`` submodule (bias-free when normalised)."""
    keys[f"{name}.weight"] = shape
    if norm == "FrozenBN":  # detectron2 FrozenBatchNorm2d: four buffers, no step counter
        for buffer in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.norm.{buffer}"] = [channels]
    elif norm == "GN":
        keys[f"{name}.norm.weight"] = [channels]
        keys[f"{name}.norm.bias"] = [channels]


def deeplab_resnet(spec: dict) -> Shapes:
    """detectron2 projects/DeepLab build_resnet_deeplab_backbone with STEM_TYPE deeplab, FrozenBN."""
    keys: Shapes = {}
    stem = spec["stem_out"]
    _conv_norm(keys, "stem.conv1", [stem // 2, 3, 3, 3], "FrozenBN", stem // 2)
    _conv_norm(keys, "stem.conv2", [stem // 2, stem // 2, 3, 3], "FrozenBN", stem // 2)
    _conv_norm(keys, "stem.conv3", [stem, stem // 2, 3, 3], "FrozenBN", stem)
    in_ch, out_ch, mid = stem, spec["res2_out"], spec["bottleneck"]
    for stage, blocks in enumerate(spec["depth_blocks"]):
        for block in range(blocks):
            name = f"res{stage + 2}.{block}"
            if in_ch != out_ch:  # BottleneckBlock adds a projection shortcut only when channels change
                _conv_norm(keys, f"{name}.shortcut", [out_ch, in_ch, 1, 1], "FrozenBN", out_ch)
            _conv_norm(keys, f"{name}.conv1", [mid, in_ch, 1, 1], "FrozenBN", mid)
            _conv_norm(keys, f"{name}.conv2", [mid, mid, 3, 3], "FrozenBN", mid)
            _conv_norm(keys, f"{name}.conv3", [out_ch, mid, 1, 1], "FrozenBN", out_ch)
            in_ch = out_ch
        out_ch, mid = out_ch * 2, mid * 2
    return keys


def resnet_channels(spec: dict) -> list[int]:
    return [spec["res2_out"] * 2**i for i in range(4)]


def d2_swin(spec: dict) -> Shapes:
    """MaskFormer mask_former/modeling/backbone/swin.py D2SwinTransformer (APE off, patch norm on)."""
    keys: Shapes = {}
    dim, patch, window = spec["embed_dim"], spec["patch"], spec["window"]
    keys["patch_embed.proj.weight"] = [dim, 3, patch, patch]
    keys["patch_embed.proj.bias"] = [dim]
    keys["patch_embed.norm.weight"] = [dim]
    keys["patch_embed.norm.bias"] = [dim]
    dims = [dim * 2**i for i in range(len(spec["depths"]))]
    hidden = spec["mlp_ratio"]
    for layer, (depth, heads, width) in enumerate(zip(spec["depths"], spec["heads"], dims)):
        for block in range(depth):
            name = f"layers.{layer}.blocks.{block}"
            keys[f"{name}.norm1.weight"] = [width]
            keys[f"{name}.norm1.bias"] = [width]
            keys[f"{name}.attn.relative_position_bias_table"] = [(2 * window - 1) ** 2, heads]
            keys[f"{name}.attn.relative_position_index"] = [window * window, window * window]
            keys[f"{name}.attn.qkv.weight"] = [3 * width, width]
            keys[f"{name}.attn.qkv.bias"] = [3 * width]
            keys[f"{name}.attn.proj.weight"] = [width, width]
            keys[f"{name}.attn.proj.bias"] = [width]
            keys[f"{name}.norm2.weight"] = [width]
            keys[f"{name}.norm2.bias"] = [width]
            keys[f"{name}.mlp.fc1.weight"] = [hidden * width, width]
            keys[f"{name}.mlp.fc1.bias"] = [hidden * width]
            keys[f"{name}.mlp.fc2.weight"] = [width, hidden * width]
            keys[f"{name}.mlp.fc2.bias"] = [width]
        if layer < len(spec["depths"]) - 1:  # PatchMerging after every stage but the last
            keys[f"layers.{layer}.downsample.reduction.weight"] = [2 * width, 4 * width]
            keys[f"layers.{layer}.downsample.norm.weight"] = [4 * width]
            keys[f"layers.{layer}.downsample.norm.bias"] = [4 * width]
    for index, width in enumerate(dims):  # out_indices (0, 1, 2, 3) each get a LayerNorm norm{i}
        keys[f"norm{index}.weight"] = [width]
        keys[f"norm{index}.bias"] = [width]
    return keys


def base_pixel_decoder(channels: list[int], conv_dim: int, mask_dim: int) -> Shapes:
    """MaskFormer BasePixelDecoder with NORM "GN": lateral ``adapter_i`` for res2..res4, ``layer_i``."""
    keys: Shapes = {}
    for index, in_ch in enumerate(channels):
        if index == len(channels) - 1:
            _conv_norm(keys, f"layer_{index + 1}", [conv_dim, in_ch, 3, 3], "GN", conv_dim)
        else:
            _conv_norm(keys, f"adapter_{index + 1}", [conv_dim, in_ch, 1, 1], "GN", conv_dim)
            _conv_norm(keys, f"layer_{index + 1}", [conv_dim, conv_dim, 3, 3], "GN", conv_dim)
    keys["mask_features.weight"] = [mask_dim, conv_dim, 3, 3]
    keys["mask_features.bias"] = [mask_dim]
    return keys


def _linear(keys: Shapes, name: str, out_dim: int, in_dim: int) -> None:
    keys[f"{name}.weight"] = [out_dim, in_dim]
    keys[f"{name}.bias"] = [out_dim]


def _mha(keys: Shapes, name: str, dim: int) -> None:
    keys[f"{name}.in_proj_weight"] = [3 * dim, dim]
    keys[f"{name}.in_proj_bias"] = [3 * dim]
    _linear(keys, f"{name}.out_proj", dim, dim)


def _mlp(keys: Shapes, name: str, in_dim: int, hidden: int, out_dim: int, layers: int) -> None:
    dims_in = [in_dim] + [hidden] * (layers - 1)
    dims_out = [hidden] * (layers - 1) + [out_dim]
    for index, (a, b) in enumerate(zip(dims_in, dims_out)):
        _linear(keys, f"{name}.layers.{index}", b, a)


def open_vocab_predictor(in_channels: int, embedding_dim: int, head: dict) -> Shapes:
    """OVSeg OpenVocabTransformerPredictor: TransformerPredictor(mask_classification=False) + class MLP.

    ``pe_layer`` (sine) has no parameters; ``transformer.encoder`` has ENC_LAYERS = 0 layers and no
    norm (PRE_NORM False), so it contributes no keys; ``input_proj`` exists because the res5
    channels differ from HIDDEN_DIM.
    """
    keys: Shapes = {}
    hidden = head["hidden_dim"]
    for layer in range(head["dec_layers"]):
        name = f"transformer.decoder.layers.{layer}"
        _mha(keys, f"{name}.self_attn", hidden)
        _mha(keys, f"{name}.multihead_attn", hidden)
        _linear(keys, f"{name}.linear1", head["dim_feedforward"], hidden)
        _linear(keys, f"{name}.linear2", hidden, head["dim_feedforward"])
        for norm in ("norm1", "norm2", "norm3"):
            keys[f"{name}.{norm}.weight"] = [hidden]
            keys[f"{name}.{norm}.bias"] = [hidden]
    keys["transformer.decoder.norm.weight"] = [hidden]
    keys["transformer.decoder.norm.bias"] = [hidden]
    keys["query_embed.weight"] = [head["num_queries"], hidden]
    if in_channels != hidden:
        keys["input_proj.weight"] = [hidden, in_channels, 1, 1]
        keys["input_proj.bias"] = [hidden]
    _mlp(keys, "class_embed", hidden, head["embed_hidden_dim"], embedding_dim, head["embed_layers"])
    _mlp(keys, "mask_embed", hidden, hidden, head["mask_dim"], 3)
    return keys


def _clip_blocks(keys: Shapes, prefix: str, width: int, layers: int) -> None:
    for layer in range(layers):
        name = f"{prefix}transformer.resblocks.{layer}"
        _mha(keys, f"{name}.attn", width)
        keys[f"{name}.ln_1.weight"] = [width]
        keys[f"{name}.ln_1.bias"] = [width]
        _linear(keys, f"{name}.mlp.c_fc", 4 * width, width)
        _linear(keys, f"{name}.mlp.c_proj", width, 4 * width)
        keys[f"{name}.ln_2.weight"] = [width]
        keys[f"{name}.ln_2.bias"] = [width]


def openai_clip(spec: dict, prompt_depth: int) -> Shapes:
    """OVSeg's third_party/CLIP model.py (OpenAI CLIP plus ``visual.mask_embedding``), ViT towers."""
    keys: Shapes = {}
    width, grid = spec["width"], spec["image"] // spec["patch"]
    keys["visual.class_embedding"] = [width]
    keys["visual.positional_embedding"] = [grid * grid + 1, width]
    keys["visual.proj"] = [width, spec["embed"]]
    keys["visual.conv1.weight"] = [width, 3, spec["patch"], spec["patch"]]
    keys["visual.ln_pre.weight"] = [width]
    keys["visual.ln_pre.bias"] = [width]
    _clip_blocks(keys, "visual.", width, spec["layers"])
    keys["visual.ln_post.weight"] = [width]
    keys["visual.ln_post.bias"] = [width]
    keys["visual.mask_embedding"] = [prompt_depth, grid * grid, width]
    text = spec["text_width"]
    keys["positional_embedding"] = [HEAD["context_length"], text]
    keys["text_projection"] = [text, spec["embed"]]
    keys["logit_scale"] = []
    keys["token_embedding.weight"] = [HEAD["vocab_size"], text]
    _clip_blocks(keys, "", text, spec["text_layers"])
    keys["ln_final.weight"] = [text]
    keys["ln_final.bias"] = [text]
    return keys


def derive(preset: str) -> dict:
    release = RELEASES[preset]
    backbone, clip = release["backbone"], release["clip"]
    if backbone["type"] == "r101c":
        backbone_keys, channels = deeplab_resnet(backbone), resnet_channels(backbone)
    else:
        backbone_keys = d2_swin(backbone)
        channels = [backbone["embed_dim"] * 2**i for i in range(4)]
    keys: Shapes = {}
    keys.update({f"backbone.{k}": v for k, v in backbone_keys.items()})
    decoder = base_pixel_decoder(channels, HEAD["conv_dim"], HEAD["mask_dim"])
    keys.update({f"sem_seg_head.pixel_decoder.{k}": v for k, v in decoder.items()})
    predictor = open_vocab_predictor(channels[-1], clip["embed"], HEAD)
    keys.update({f"sem_seg_head.predictor.{k}": v for k, v in predictor.items()})
    keys["criterion.empty_weight"] = [HEAD["num_classes"] + 1]
    keys["clip_adapter.non_object_embedding"] = [1, clip["embed"]]
    keys["clip_adapter.pixel_mean"] = [1, 3, 1, 1]
    keys["clip_adapter.pixel_std"] = [1, 3, 1, 1]
    keys.update({f"clip_adapter.clip_model.{k}": v
                 for k, v in openai_clip(clip, HEAD["mask_prompt_depth"]).items()})
    dtypes = {k: "int64" for k in keys if k.endswith("relative_position_index")}
    numel = sum(_prod(shape) for shape in keys.values())
    return {
        "preset": preset,
        "release_files": release["release_files"],
        "container": "detectron2 checkpoint: a torch.save'd dict whose 'model' entry is the state dict",
        "architecture": {"backbone": backbone, "clip": clip, "head": HEAD},
        "not_loaded": NOT_LOADED,
        "dtypes": dtypes,
        "num_keys": len(keys),
        "num_elements": numel,
        "keys": keys,
    }


def _prod(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def to_json(manifest: dict) -> str:
    """Indented JSON with every shape on its key's line (one key per line, easy to grep and diff)."""
    text = json.dumps(manifest, indent=1)
    return re.sub(r"\[\s*([-\d,\s]*?)\s*\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]",
                  text) + "\n"


def write_all() -> list[Path]:
    written = []
    for preset, release in RELEASES.items():
        path = MANIFEST_DIR / release["file"]
        path.write_text(to_json(derive(preset)))
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_all():
        print(f"wrote {written_path}")
