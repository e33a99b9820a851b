"""Issue 7: load the published weights (OVSeg release checkpoints, OpenAI / OpenCLIP CLIP) and convert them.

The real presets are exercised with synthetic checkpoints built from the key manifests (random values,
exactly the manifest's keys and shapes); the manifests themselves are derived from the published
module definitions independently of ``ovseg_ray.models``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import zipfile

import numpy as np
import pytest
import s3fs
import torch
from PIL import Image

from ovseg_ray.cli import main
from ovseg_ray.data.images import load_image
from ovseg_ray.inference import Segmenter
from ovseg_ray.weights.checkpoint import save_checkpoint
from ovseg_ray.weights.errors import CheckpointError, CheckpointMismatchError
from ovseg_ray.models.clip import create_clip
from ovseg_ray.models.ovseg import build_model, load_weights
from ovseg_ray.weights import (RawCheckpoint, load_clip_weights, load_manifest, load_model_weights, map_to_ours,
                               read_tensors)
from ovseg_ray.weights.loading import fit_state, preset_hint
from ovseg_ray.weights.readers import safetensors_metadata
from ovseg_ray.weights.manifests import derive

RELEASE_CLIP = "clip_adapter.clip_model."
NOT_LOADED = {"criterion.empty_weight", "clip_adapter.pixel_mean", "clip_adapter.pixel_std"}
CLASSES = "sky,grass,sand,water,red circle"


# ---- helpers: checkpoints as the published code would write them ---------------------------------

def relative_position_index(window: int) -> torch.Tensor:
    """Swin's index of (dy, dx) in its (2w-1)^2 bias table, from the published formula."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return relative[0] * (2 * window - 1) + relative[1]


def synthetic_release_state(preset: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values with exactly the manifest's keys and shapes (true values for the index buffers).

    Every tensor is a window of one random pool, each at its own offset, so no two keys hold the same
    values (a tensor landing in the wrong place is caught) while the file stays small and quick to write.
    """
    manifest = load_manifest(preset)
    sizes = {key: int(np.prod(shape)) for key, shape in manifest.keys.items()}
    stride = 4099
    pool = torch.randn(max(sizes.values()) + stride * len(sizes), generator=torch.Generator().manual_seed(seed))
    state = {}
    for index, (key, shape) in enumerate(manifest.keys.items()):
        if key.endswith("relative_position_index"):
            state[key] = relative_position_index(int(round(shape[0] ** 0.5)))
        else:
            state[key] = pool[index * stride: index * stride + sizes[key]].view(shape)
    return state


def release_layout(our_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our layout renamed the way OVSeg's detectron2 model names it (manifests/README.md table)."""
    out = {}
    for key, value in our_state.items():
        if key.startswith("maskformer."):
            out[key[len("maskformer."):]] = value
        elif key.startswith("clip."):
            out[RELEASE_CLIP + key[len("clip."):]] = value
        elif key == "region_encoder.mask_prompts":
            out[RELEASE_CLIP + "visual.mask_embedding"] = value
        elif key == "non_object_embedding":
            out["clip_adapter.non_object_embedding"] = value
    out["criterion.empty_weight"] = torch.ones(172)
    out["clip_adapter.pixel_mean"] = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1) * 255
    out["clip_adapter.pixel_std"] = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1) * 255
    return out


def save_detectron2(state: dict[str, torch.Tensor], path) -> str:
    torch.save({"model": state, "iteration": 119999}, str(path))
    return str(path)


def assert_same_state(model, expected: dict[str, torch.Tensor]) -> None:
    actual = model.state_dict()
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value.to(actual[key].dtype)), key


@pytest.fixture(scope="module")
def r101c_model():
    return build_model("r101c-vitb16")


# ---- the manifests ----------------------------------------------------------------------------------

def test_manifests_match_their_derivation_and_the_published_shapes():
    for preset, release in derive.RELEASES.items():
        on_disk = (derive.MANIFEST_DIR / release["file"]).read_text()
        assert on_disk == derive.to_json(derive.derive(preset)), f"regenerate {release['file']}"
    r101 = load_manifest("r101c-vitb16")
    # stem 3 convs x 5 + 33 bottlenecks x 3 convs x 5 + 4 shortcuts x 5; decoder 23; predictor 123;
    # criterion + non-object + 2 pixel buffers; CLIP visual 153 and text 150 (hand count from the sources)
    assert len(r101.keys) == 15 + 33 * 15 + 4 * 5 + 23 + 123 + 4 + 153 + 150 == 983
    assert r101.keys["criterion.empty_weight"] == (172,)
    assert r101.keys["clip_adapter.non_object_embedding"] == (1, 512)
    assert r101.keys[RELEASE_CLIP + "visual.mask_embedding"] == (3, 196, 768)
    assert r101.keys["backbone.stem.conv3.weight"] == (128, 64, 3, 3)
    assert r101.keys["backbone.res5.2.conv2.weight"] == (512, 512, 3, 3)
    assert "backbone.res2.1.shortcut.weight" not in r101.keys and "backbone.res2.0.shortcut.weight" in r101.keys
    assert r101.keys["sem_seg_head.pixel_decoder.layer_4.weight"] == (256, 2048, 3, 3)
    assert r101.keys["sem_seg_head.predictor.input_proj.weight"] == (256, 2048, 1, 1)
    assert r101.keys["sem_seg_head.predictor.class_embed.layers.0.weight"] == (1024, 256)
    assert r101.keys["sem_seg_head.predictor.class_embed.layers.1.weight"] == (512, 1024)
    assert not any("transformer.encoder" in k or "pe_layer" in k or "num_batches" in k for k in r101.keys)
    swin = load_manifest("swinb-vitl14")
    assert swin.keys[RELEASE_CLIP + "visual.mask_embedding"] == (3, 256, 1024)
    assert swin.keys["clip_adapter.non_object_embedding"] == (1, 768)
    assert swin.keys["backbone.layers.2.blocks.17.attn.relative_position_bias_table"] == (529, 16)
    assert swin.keys["backbone.norm3.weight"] == (1024,)
    assert swin.keys["sem_seg_head.predictor.input_proj.weight"] == (256, 1024, 1, 1)
    assert "backbone.layers.3.downsample.reduction.weight" not in swin.keys
    assert not any("absolute_pos_embed" in k for k in swin.keys)
    assert set(r101.not_loaded) == set(swin.not_loaded) == NOT_LOADED


# ---- acceptance 1: a synthetic release checkpoint of each preset loads, every tensor in place ------

def _check_landed(model, release: dict[str, torch.Tensor], preset: str) -> None:
    """Every loaded release tensor equals the model tensor it was meant for (by attribute, not by map)."""
    mf, clip = model.maskformer, model.clip
    prompts = release[RELEASE_CLIP + "visual.mask_embedding"]
    assert torch.equal(model.region_encoder.mask_prompts, prompts)
    assert torch.equal(model.non_object_embedding, release["clip_adapter.non_object_embedding"])
    last = len(clip.visual.transformer.resblocks) - 1
    pairs = [
        (clip.visual.transformer.resblocks[last].attn.in_proj_weight,
         f"visual.transformer.resblocks.{last}.attn.in_proj_weight"),
        (clip.visual.conv1.weight, "visual.conv1.weight"), (clip.visual.proj, "visual.proj"),
        (clip.visual.class_embedding, "visual.class_embedding"), (clip.token_embedding.weight, "token_embedding.weight"),
        (clip.text_projection, "text_projection"), (clip.logit_scale, "logit_scale"),
        (clip.transformer.resblocks[11].mlp.c_proj.weight, "transformer.resblocks.11.mlp.c_proj.weight"),
        (model.region_encoder.visual.ln_post.bias, "visual.ln_post.bias"),
    ]
    for tensor, key in pairs:
        assert torch.equal(tensor, release[RELEASE_CLIP + key]), key
    head = mf.sem_seg_head
    assert torch.equal(head.predictor.class_embed.layers[1].weight,
                       release["sem_seg_head.predictor.class_embed.layers.1.weight"])
    assert torch.equal(head.predictor.query_embed.weight, release["sem_seg_head.predictor.query_embed.weight"])
    assert torch.equal(head.predictor.transformer.decoder.layers[5].multihead_attn.in_proj_weight,
                       release["sem_seg_head.predictor.transformer.decoder.layers.5.multihead_attn.in_proj_weight"])
    assert torch.equal(head.pixel_decoder.adapter_1.norm.weight,
                       release["sem_seg_head.pixel_decoder.adapter_1.norm.weight"])
    if preset == "r101c-vitb16":
        assert torch.equal(mf.backbone.stem.conv1.norm.running_var, release["backbone.stem.conv1.norm.running_var"])
        assert torch.equal(mf.backbone.res4[22].conv3.weight, release["backbone.res4.22.conv3.weight"])
    else:
        assert torch.equal(mf.backbone.patch_embed.proj.weight, release["backbone.patch_embed.proj.weight"])
        table = mf.backbone.layers[2].blocks[17].attn.relative_position_bias_table
        assert torch.equal(table, release["backbone.layers.2.blocks.17.attn.relative_position_bias_table"])
    # and every other tensor: the model's whole state is the release state renamed
    ours = {k: v for k, v in map_to_ours(release, "release").tensors.items()}
    assert_same_state(model, ours)


def test_release_checkpoint_of_swinb_vitl14_loads_with_every_tensor_in_place(tmp_path, caplog):
    release = synthetic_release_state("swinb-vitl14", seed=1)
    path = save_detectron2(release, tmp_path / "ovseg_swinbase_vitL14_ft_mpt.pth")
    model = build_model("swinb-vitl14", seed=5)
    with caplog.at_level("INFO", logger="ovseg_ray.weights"):
        report = load_model_weights(model, path)
    assert report.layout == "ovseg-release" and report.loaded == len(model.state_dict()) == 951
    assert set(report.not_loaded) == NOT_LOADED and "criterion.empty_weight" in caplog.text
    _check_landed(model, release, "swinb-vitl14")
    # the index buffers are derived from the window size: a file with another layout is refused
    key = "backbone.layers.1.blocks.1.attn.relative_position_index"
    other = {**release, key: release[key].flip(0)}
    with pytest.raises(CheckpointError, match=f"{key} .*differs from the model's window layout"):
        fit_state(model.state_dict(), map_to_ours(other, "other.pth"), "other.pth")


def test_release_checkpoint_of_r101c_vitb16_converts_then_loads(tmp_path, capsys):
    release = synthetic_release_state("r101c-vitb16", seed=2)
    source = save_detectron2(release, tmp_path / "ovseg_R101c_vitB16_ft_mpt.pth")
    out = str(tmp_path / "r101c.safetensors")
    assert main(["convert", source, out]) == 0  # the preset is recognised from the keys
    printed = capsys.readouterr().out
    assert "preset r101c-vitb16" in printed and "980 tensors" in printed
    assert "left out criterion.empty_weight: training only" in printed
    metadata = read_tensors(out).metadata
    assert metadata["preset"] == "r101c-vitb16" and metadata["content"] == "full"
    assert json.loads(metadata["not_loaded"]) == sorted(NOT_LOADED)
    del release
    model = build_model("r101c-vitb16", weights=out)
    _check_landed(model, torch.load(source, weights_only=True)["model"], "r101c-vitb16")


# ---- acceptance 2: OpenAI-named CLIP weights give open_clip's embeddings ---------------------------

def _openai_named(reference) -> dict[str, torch.Tensor]:
    """The reference CLIP's tensors under the OpenAI names listed in the r101c manifest.

    A KeyError here would mean open_clip names a tensor differently from OpenAI's CLIP.
    """
    state = reference.state_dict()
    names = [k[len(RELEASE_CLIP):] for k in load_manifest("r101c-vitb16").keys if k.startswith(RELEASE_CLIP)]
    openai = {name: state[name] for name in names if name != "visual.mask_embedding"}
    assert set(state) - set(openai) <= {"attn_mask"}
    return openai


def test_openai_clip_state_dict_gives_open_clips_embeddings(tmp_path, r101c_model):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        reference = create_clip("ViT-B-16-quickgelu")
    openai = _openai_named(reference)
    prompts = torch.randn(3, 196, 768)
    openai["visual.mask_embedding"] = prompts
    openai.update({"input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
                   "vocab_size": torch.tensor(49408)})
    path = str(tmp_path / "ViT-B-16.pt")
    torch.save(openai, path)
    maskformer_before = r101c_model.maskformer.sem_seg_head.predictor.query_embed.weight.clone()
    report = load_clip_weights(r101c_model, path)
    assert report.layout == "clip" and set(report.not_loaded) == {"input_resolution", "context_length", "vocab_size"}
    assert torch.equal(r101c_model.region_encoder.mask_prompts, prompts)
    assert torch.equal(r101c_model.maskformer.sem_seg_head.predictor.query_embed.weight, maskformer_before)

    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tokens = r101c_model.tokenizer(["a photo of a kite"])
    half_masked = torch.zeros(1, 224, 224)
    half_masked[:, :112] = 1
    with torch.no_grad():
        expected_image, expected_text = reference.encode_image(images), reference.encode_text(tokens)
        torch.testing.assert_close(r101c_model.region_encoder(images), expected_image, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r101c_model.clip.encode_text(tokens), expected_text, rtol=1e-5, atol=1e-5)
        # the loaded prompts replace the masked patches' tokens
        assert not torch.allclose(r101c_model.region_encoder(images, half_masked), expected_image, atol=1e-3)


def test_torchscript_archive_is_read_without_running_its_code(tmp_path, tiny_model):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        reference = create_clip("ovseg-tiny-vit").half()
    traced = torch.jit.trace_module(reference, {"encode_image": torch.randn(1, 3, 64, 64).half()}, check_trace=False)
    path = str(tmp_path / "tiny-jit.pt")
    traced.save(path)
    raw = read_tensors(path)
    assert raw.container == "torchscript" and raw.tensors["visual.proj"].dtype == torch.float16
    model = build_model("tiny", seed=8)
    load_clip_weights(model, path)  # fp16 archive -> fp32 model
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.region_encoder(images), reference.float().encode_image(images),
                                   rtol=1e-4, atol=1e-4)

    # an archive whose data.pkl asks for anything but tensors is refused before anything runs
    marker = tmp_path / "pwned"
    evil = io.BytesIO()
    with zipfile.ZipFile(path) as good, zipfile.ZipFile(evil, "w") as bad:
        for name in good.namelist():
            data = good.read(name)
            if name.endswith("/data.pkl"):
                data = b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."
            bad.writestr(name, data)
    evil_path = tmp_path / "evil-jit.pt"
    evil_path.write_bytes(evil.getvalue())
    with pytest.raises(CheckpointError, match="os.system"):
        read_tensors(str(evil_path))
    assert not marker.exists()


# ---- acceptance 3: renamed, missing and mis-shaped keys are named ----------------------------------

def test_renamed_missing_and_misshaped_release_keys_are_named(r101c_model):
    expected = r101c_model.state_dict()
    base = synthetic_release_state("r101c-vitb16", seed=3)

    renamed = dict(base)
    renamed["sem_seg_head.predictor.query_embedding.weight"] = renamed.pop("sem_seg_head.predictor.query_embed.weight")
    with pytest.raises(CheckpointMismatchError) as info:
        fit_state(expected, map_to_ours(renamed, "renamed.pth"), "renamed.pth")
    message = str(info.value)
    assert "missing keys (1): sem_seg_head.predictor.query_embed.weight " \
           "(model key maskformer.sem_seg_head.predictor.query_embed.weight)" in message
    assert "unexpected keys (1): sem_seg_head.predictor.query_embedding.weight" in message

    missing = dict(base)
    del missing[RELEASE_CLIP + "visual.mask_embedding"]
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): clip_adapter\.clip_model\.visual\."
                                                      r"mask_embedding \(model key region_encoder\.mask_prompts\)"):
        fit_state(expected, map_to_ours(missing, "missing.pth"), "missing.pth")

    misshaped = dict(base)
    misshaped["clip_adapter.non_object_embedding"] = torch.zeros(1, 768)
    with pytest.raises(CheckpointMismatchError) as info:
        fit_state(expected, map_to_ours(misshaped, "misshaped.pth"), "misshaped.pth")
    assert ("shape mismatches (1): clip_adapter.non_object_embedding (model key non_object_embedding): "
            "checkpoint (1, 768) vs model (1, 512)") in str(info.value)

    stranger = dict(base)
    stranger["clip_adapter.prompt_learner.ctx"] = torch.zeros(16, 512)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(1\): clip_adapter\.prompt_learner\.ctx"):
        fit_state(expected, map_to_ours(stranger, "stranger.pth"), "stranger.pth")


def test_mismatches_in_files_are_named_and_wrong_preset_is_pointed_out(tmp_path, tiny_model, synth_dataset, capsys):
    release = release_layout(tiny_model.state_dict())
    cases = {
        "renamed": ("sem_seg_head.pixel_decoder.mask_features.weight", "sem_seg_head.pixel_decoder.mask_feature.weight"),
        "missing": ("clip_adapter.clip_model.ln_final.bias", None),
        "misshaped": ("sem_seg_head.predictor.query_embed.weight", torch.zeros(3, 3)),
    }
    model = build_model("tiny", seed=2)
    for name, (key, change) in cases.items():
        state = dict(release)
        value = state.pop(key)
        if isinstance(change, str):
            state[change] = value
        elif change is not None:
            state[key] = change
        path = save_detectron2(state, tmp_path / f"{name}.pth")
        with pytest.raises(CheckpointMismatchError) as info:
            load_weights(model, path)
        message = str(info.value)
        assert path in message and key in message, message
        if isinstance(change, str):
            assert f"unexpected keys (1): {change}" in message
    image = str(synth_dataset / "images" / "000000000001.jpg")
    assert main(["segment", image, "--classes", "sky", "--weights", str(tmp_path / "missing.pth"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "missing keys (1): clip_adapter.clip_model.ln_final.bias (model key clip.ln_final.bias)" in \
        capsys.readouterr().err

    # a release checkpoint of another preset is recognised from its shapes (meta tensors: no memory)
    swin_like = {k: torch.empty(v, device="meta") for k, v in load_manifest("swinb-vitl14").keys.items()}
    raw = RawCheckpoint("swin.pth", "torch", swin_like)
    assert preset_hint(raw, map_to_ours(swin_like, "swin.pth"), model) == \
        "this checkpoint was made for preset 'swinb-vitl14', the model is 'tiny'"
    assert preset_hint(RawCheckpoint("t.pth", "torch", release), map_to_ours(release, "t.pth"), model) == ""


# ---- acceptance 4: convert then segment, local and S3 -------------------------------------------------

def _labels_from(uri_prefix: str, stem: str) -> np.ndarray:
    from ovseg_ray.data import storage

    data = storage.read_bytes(f"{uri_prefix}/{stem}.labels.png")
    return np.asarray(Image.open(io.BytesIO(data)))


def test_convert_then_segment_from_local_files_and_s3(tmp_path, s3_bucket, synth_dataset, capsys):
    source_model = build_model("tiny", seed=3)
    image_path = str(synth_dataset / "images" / "000000000002.jpg")
    expected = Segmenter(source_model).segment(load_image(image_path), CLASSES.split(",")).labels
    release = release_layout(source_model.state_dict())
    local_release = save_detectron2(release, tmp_path / "ovseg_tiny.pth")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    fs.put(local_release, f"{s3_bucket[5:]}/weights/ovseg_tiny.pth")

    # tiny has no manifest: the preset must be given
    assert main(["convert", local_release, str(tmp_path / "x.safetensors")]) == 2
    assert "give --preset" in capsys.readouterr().err

    local_out = str(tmp_path / "tiny.safetensors")
    s3_out = f"{s3_bucket}/converted/tiny.safetensors"
    assert main(["convert", local_release, local_out, "--preset", "tiny"]) == 0
    assert main(["convert", f"{s3_bucket}/weights/ovseg_tiny.pth", s3_out, "--preset", "tiny"]) == 0
    printed = capsys.readouterr().out
    assert f"-> {s3_out}: whole model, preset tiny" in printed

    runs = {
        "local": (local_out, str(tmp_path / "seg-local")),
        "s3": (s3_out, f"{s3_bucket}/seg"),
        "release-direct": (f"{s3_bucket}/weights/ovseg_tiny.pth", str(tmp_path / "seg-direct")),
    }
    for name, (weights, out) in runs.items():
        code = main(["segment", image_path, "--preset", "tiny", "--weights", weights, "--classes", CLASSES,
                     "--out", out, "--device", "cpu"])
        assert code == 0, name
        assert np.array_equal(_labels_from(out, "000000000002"), expected), name
    assert np.array_equal(load_image(image_path).shape[:2], expected.shape)


# ---- round trips, CLIP-only files, merging, refusing unsafe pickles ---------------------------------

def test_our_checkpoints_round_trip_and_convert_to_half(tmp_path, tiny_model, capsys):
    ours = str(tmp_path / "ours.safetensors")
    save_checkpoint(tiny_model, ours)
    same = str(tmp_path / "same.safetensors")
    half = str(tmp_path / "half.safetensors")
    assert main(["convert", ours, same, "--preset", "tiny"]) == 0
    assert main(["convert", same, half, "--dtype", "float16"]) == 0  # preset recorded in the first output
    model = build_model("tiny", seed=9)
    load_weights(model, same)
    assert_same_state(model, tiny_model.state_dict())
    load_weights(model, half)
    assert_same_state(model, {k: v.half() if v.is_floating_point() else v for k, v in tiny_model.state_dict().items()})
    assert read_tensors(half).tensors["non_object_embedding"].dtype == torch.float16
    assert main(["convert", ours, str(tmp_path / "bad.pt")]) == 2
    assert "*.safetensors" in capsys.readouterr().err


def test_clip_only_files_convert_load_and_merge(tmp_path, tiny_model, capsys):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(21)
        clip = create_clip("ovseg-tiny-vit")
    openclip = {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}
    openclip["state_dict"]["module.visual.mask_embedding"] = torch.randn(3, 1, 64)  # one prompt shared by all patches
    clip_path = str(tmp_path / "epoch_1.pt")
    torch.save(openclip, clip_path)

    assert main(["convert", clip_path, str(tmp_path / "c.safetensors")]) == 2
    assert "give --preset" in capsys.readouterr().err
    clip_only = str(tmp_path / "clip.safetensors")
    assert main(["convert", clip_path, clip_only, "--preset", "tiny"]) == 0
    assert "CLIP only, preset tiny" in capsys.readouterr().out
    stored = read_tensors(clip_only)
    assert stored.metadata["content"] == "clip" and stored.tensors["region_encoder.mask_prompts"].shape == (3, 64, 64)
    assert all(k.startswith("clip.") or k == "region_encoder.mask_prompts" for k in stored.tensors)

    model = build_model("tiny", seed=1)
    with pytest.raises(CheckpointError, match="only CLIP weights.*--clip-weights"):
        load_weights(model, clip_only)
    full = _save(tiny_model, tmp_path)
    with pytest.raises(CheckpointError, match="whole-model checkpoint"):
        load_clip_weights(model, full)

    merged = str(tmp_path / "merged.safetensors")
    assert main(["convert", full, merged, "--clip-weights", clip_only, "--preset", "tiny"]) == 0
    load_weights(model, merged)
    state = model.state_dict()
    for key, value in clip.state_dict().items():
        if key != "attn_mask":
            assert torch.equal(state[f"clip.{key}"], value), key
    assert torch.equal(model.region_encoder.mask_prompts, openclip["state_dict"]["module.visual.mask_embedding"].expand(3, 64, 64))
    assert torch.equal(model.maskformer.sem_seg_head.predictor.query_embed.weight,
                       tiny_model.maskformer.sem_seg_head.predictor.query_embed.weight)
    assert torch.equal(model.non_object_embedding, tiny_model.non_object_embedding)

    # a CLIP without prompts keeps the model's own prompts, and says so
    no_prompts = str(tmp_path / "noprompt.pt")
    torch.save(clip.state_dict(), no_prompts)
    before = model.region_encoder.mask_prompts.clone()
    assert load_clip_weights(model, no_prompts).kept == ["mask prompts"]
    assert torch.equal(model.region_encoder.mask_prompts, before)


def _save(model, tmp_path) -> str:
    path = str(tmp_path / "full.safetensors")
    save_checkpoint(model, path)
    return path


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickles_that_need_more_than_tensors_are_refused_unless_trusted(tmp_path, tiny_model, capsys):
    marker = tmp_path / "pwned"
    evil = str(tmp_path / "evil.pth")
    torch.save({"model": release_layout(tiny_model.state_dict()), "hook": _RunsCode(str(marker))}, evil)
    model = build_model("tiny", seed=4)
    with pytest.raises(CheckpointError) as info:
        load_weights(model, evil)
    message = str(info.value)
    assert "arbitrary code" in message and "ovseg-ray convert" in message and "--trust-pickle" in message
    assert not marker.exists()

    with_args = str(tmp_path / "with_args.pth")  # e.g. training scripts that store their argparse Namespace
    torch.save({"model": release_layout(tiny_model.state_dict()), "args": argparse.Namespace(lr=0.1)}, with_args)
    out = str(tmp_path / "trusted.safetensors")
    assert main(["convert", with_args, out, "--preset", "tiny"]) == 2
    assert "argparse" in capsys.readouterr().err
    assert main(["convert", with_args, out, "--preset", "tiny", "--trust-pickle"]) == 0
    assert "warning: --trust-pickle" in capsys.readouterr().out
    load_weights(model, out)
    assert_same_state(model, tiny_model.state_dict())

    numpy_state = {k: v.numpy() for k, v in release_layout(tiny_model.state_dict()).items()}
    numpy_path = str(tmp_path / "numpy.pth")  # numpy arrays are plain data: no trust needed
    torch.save({"model": numpy_state}, numpy_path)
    load_weights(model, numpy_path)
    assert_same_state(model, tiny_model.state_dict())


def test_release_details_batchnorm_counters_shared_prompts_and_corrupt_files(tmp_path, tiny_model):
    release = release_layout(tiny_model.state_dict())
    release["backbone.res2.0.norm.num_batches_tracked"] = torch.tensor(5)
    prompt = torch.randn(3, 1, 64)
    release[RELEASE_CLIP + "visual.mask_embedding"] = prompt
    model = build_model("tiny", seed=6)
    report = load_model_weights(model, save_detectron2(release, tmp_path / "r.pth"))
    assert "backbone.res2.0.norm.num_batches_tracked" in report.not_loaded
    assert torch.equal(model.region_encoder.mask_prompts, prompt.expand(3, 64, 64))

    corrupt = tmp_path / "corrupt.safetensors"
    save_checkpoint(tiny_model, str(corrupt))
    corrupt.write_bytes(corrupt.read_bytes()[:4000])
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        load_weights(model, str(corrupt))
    unknown = str(tmp_path / "unknown.pt")
    torch.save({"encoder.layer.0.weight": torch.zeros(2)}, unknown)
    with pytest.raises(CheckpointError, match="cannot tell what .*unknown.pt holds"):
        load_weights(model, unknown)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load_weights(model, str(tmp_path / "nothing-here.pth"))


def test_safetensors_metadata_from_the_header_alone(tmp_path):
    ours = str(tmp_path / "model.safetensors")
    save_checkpoint({"w": torch.ones(2)}, ours, metadata={"mode": "ft", "epoch": "3"})
    assert safetensors_metadata(ours) == {"mode": "ft", "epoch": "3"}
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, pickled)
    assert safetensors_metadata(str(pickled)) == {}  # not safetensors: no record, no error
    corrupt = tmp_path / "corrupt.safetensors"
    header = b'{"__metadata__": {"mode": '
    corrupt.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match=f"cannot read safetensors file {corrupt}: corrupt header"):
        safetensors_metadata(str(corrupt))
