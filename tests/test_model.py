"""The assembled model: presets, checkpoints, two-stage inference at any size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovseg_ray.inference import Segmenter, processing_size
from ovseg_ray.weights.checkpoint import save_checkpoint
from ovseg_ray.weights.errors import CheckpointMismatchError
from ovseg_ray.models.ovseg import build_model, load_weights, preset_names


def test_presets_are_listed_and_seeded():
    assert {"tiny", "r101c-vitb16", "swinb-vitl14"} <= set(preset_names())
    a, b = build_model("tiny"), build_model("tiny")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_model("tiny", seed=1)
    assert not torch.equal(a.non_object_embedding, c.non_object_embedding)


def test_real_presets_have_the_papers_dimensions():
    model = build_model("r101c-vitb16")
    assert model.region_encoder.output_dim == 512 and model.region_encoder.image_size == 224
    assert model.region_encoder.mask_prompts.shape == (3, 196, 768)
    assert model.maskformer.sem_seg_head.predictor.query_embed.weight.shape == (100, 256)
    assert model.non_object_embedding.shape == (1, 512)
    assert model.clip.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"


def test_checkpoint_round_trip_and_clear_mismatch(tmp_path, tiny_model):
    path = str(tmp_path / "tiny.safetensors")
    save_checkpoint(tiny_model, path)
    other = build_model("tiny", seed=5)
    load_weights(other, path)
    assert all(torch.equal(x, y) for x, y in zip(tiny_model.state_dict().values(), other.state_dict().values()))

    state = dict(tiny_model.state_dict())
    state.pop("non_object_embedding")
    state["maskformer.extra.weight"] = torch.zeros(1)
    state["region_encoder.mask_prompts"] = torch.zeros(2, 2)
    bad = str(tmp_path / "bad.safetensors")
    save_checkpoint(state, bad)
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(other, bad)
    message = str(info.value)
    assert "missing keys (1): non_object_embedding" in message
    assert "unexpected keys (1): maskformer.extra.weight" in message
    assert "region_encoder.mask_prompts" in message and bad in message
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load_weights(other, str(tmp_path / "nothing-here.pt"))


@pytest.mark.parametrize("shape", [(61, 200), (300, 97), (128, 128)])
def test_segment_any_size_returns_input_resolution(tiny_model, shape):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    result = Segmenter(tiny_model).segment(image, ["sky", "grass", "boat"])
    assert result.labels.shape == shape and result.labels.dtype == np.int32
    assert result.labels.min() >= 0 and result.labels.max() < 3
    assert result.num_proposals == 16


def test_lambda_zero_skips_clip_and_matches_maskformer_only(tiny_model):
    segmenter = Segmenter(tiny_model)
    image = np.random.default_rng(1).integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    result = segmenter.segment(image, ["a", "b", "c"], lam=0.0)
    assert result.num_valid_regions == 0
    proposals = segmenter.propose(image)
    p_mf = segmenter.maskformer_probs(proposals.class_embeddings, ["a", "b", "c"])
    scores = torch.einsum("qc,qhw->chw", p_mf, proposals.mask_logits.sigmoid())  # at the processing size
    expected = torch.nn.functional.interpolate(scores[None], size=(90, 120), mode="bilinear",
                                               align_corners=False)[0].argmax(0)
    assert np.array_equal(result.labels, expected.numpy())
    with pytest.raises(ValueError, match="lambda"):
        segmenter.segment(image, ["a"], lam=2.0)
    with pytest.raises(ValueError, match="mask_threshold"):
        segmenter.segment(image, ["a"], mask_threshold=1.0)


def test_processing_size_follows_shorter_side_with_cap():
    assert processing_size(480, 640, 512, 2048) == (512, 683)
    assert processing_size(100, 4000, 512, 2048) == (51, 2048)


def test_clip_weights_replace_the_models_clip(tmp_path):
    """An OpenCLIP-style checkpoint ({"state_dict": {"module.*"}}) given as clip_weights replaces CLIP only."""
    donor = build_model("tiny", seed=9)
    path = str(tmp_path / "openclip.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in donor.clip.state_dict().items()}}, path)
    model = build_model("tiny", clip_weights=path)
    for key, value in donor.clip.state_dict().items():
        assert torch.equal(model.clip.state_dict()[key], value), key
    # build_model without weights is the seed-0 random model: its MaskFormer must be untouched.
    assert torch.equal(model.maskformer.sem_seg_head.predictor.query_embed.weight,
                       build_model("tiny").maskformer.sem_seg_head.predictor.query_embed.weight)


def test_preset_can_be_a_model_config_file(tmp_path):
    config = build_model("tiny").config.model_copy(update={"prompt_depth": 2, "name": "tiny-depth2"})
    path = tmp_path / "model_config.json"
    path.write_text(config.model_dump_json())
    model = build_model(str(path))
    assert model.region_encoder.mask_prompts.shape[0] == 2 and model.config.name == "tiny-depth2"
    path.write_text('{"clip_arch": "ovseg-tiny-vit", "prompt_depth": -1}')
    with pytest.raises(ValueError, match="prompt_depth"):
        build_model(str(path))
