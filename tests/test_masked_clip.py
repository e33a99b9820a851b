"""Mask prompt tuning on open_clip's VisionTransformer (issue 2, acceptance 1-3)."""

from __future__ import annotations

import pytest
import torch

from ovseg_ray.models.clip import create_clip
from ovseg_ray.models.masked_clip import MaskedVisionEncoder


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return create_clip("ovseg-tiny-vit")


@pytest.mark.parametrize("arch", ["ovseg-tiny-vit", "ViT-B-16", "ViT-B-16-quickgelu"])
def test_unmasked_equals_open_clip_encode_image(arch):
    torch.manual_seed(1)
    clip = create_clip(arch)
    encoder = MaskedVisionEncoder(clip.visual, prompt_depth=3)
    size = encoder.image_size
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference = clip.encode_image(images)
        all_ones = encoder(images, torch.ones(2, size, size))
        no_mask = encoder(images)
        disabled = MaskedVisionEncoder(clip.visual, prompt_depth=0)(images, torch.zeros(2, size, size))
        half = torch.ones(2, size, size)
        half[:, : size // 2] = 0
        masked = encoder(images, half)
    assert torch.allclose(all_ones, reference, atol=1e-5)
    assert torch.allclose(no_mask, reference, atol=1e-5)
    assert torch.allclose(disabled, reference, atol=1e-5)
    # and masking does change the embedding (the prompts are really used)
    assert not torch.allclose(masked, reference, atol=1e-3)


def test_patch_mask_counts_a_patch_masked_only_when_all_pixels_are(tiny_clip):
    encoder = MaskedVisionEncoder(tiny_clip.visual, prompt_depth=3)
    patch = encoder.visual.patch_size[0]
    size = encoder.image_size
    grid = size // patch
    mask = torch.ones(1, size, size)
    mask[0, :patch, :patch] = 0  # patch 0: fully masked
    mask[0, :patch, patch : 2 * patch] = 0
    mask[0, patch - 1, 2 * patch - 1] = 1  # patch 1: one foreground pixel left
    keep = encoder.patch_keep(mask)[0, :, 0]
    assert keep.shape == (grid * grid,)
    assert keep[0] == 0 and keep[1] == 1 and keep[2:].eq(1).all()


def test_prompt_substitution_at_input_and_after_first_blocks(tiny_clip):
    torch.manual_seed(2)
    encoder = MaskedVisionEncoder(tiny_clip.visual, prompt_depth=3).eval()
    visual = encoder.visual
    patch = visual.patch_size[0]
    size = encoder.image_size
    images = torch.randn(1, 3, size, size)
    mask = torch.ones(1, size, size)
    mask[0, :patch, :patch] = 0  # patch 0 fully masked -> prompt
    mask[0, :patch, patch : 2 * patch] = 0
    mask[0, 0, patch] = 1  # patch 1 keeps a single foreground pixel -> keeps its token
    masked = torch.tensor([0])

    seen = {}
    handles = [visual.ln_pre.register_forward_pre_hook(lambda m, a: seen.__setitem__("ln_pre_in", a[0].clone()))]
    for i, block in enumerate(visual.transformer.resblocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, i=i: seen.__setitem__(f"in{i}", a[0].clone())))
        handles.append(block.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(f"out{i}", out.clone())))
    with torch.no_grad():
        encoder(images, mask)
        tokens = visual.conv1(images).flatten(2).transpose(1, 2)[0]  # (N, width) raw patch tokens
    for handle in handles:
        handle.remove()

    prompts = encoder.mask_prompts.detach()
    pos = visual.positional_embedding.detach()
    x = seen["ln_pre_in"][0]
    # input: masked patch -> P[0], partly visible patch and the rest -> own token; class token untouched
    assert torch.allclose(x[1 + 0], prompts[0, 0] + pos[1], atol=1e-6)
    assert torch.allclose(x[1 + 1], tokens[1] + pos[2], atol=1e-6)
    assert torch.allclose(x[1 + 5], tokens[5] + pos[6], atol=1e-6)
    assert torch.allclose(x[0], visual.class_embedding + pos[0], atol=1e-6)

    # after blocks 1 and 2 (index 0, 1) masked patch tokens become P[1], P[2]; after block 3 nothing changes
    for block_index, depth in ((0, 1), (1, 2)):
        out, nxt = seen[f"out{block_index}"][0], seen[f"in{block_index + 1}"][0]
        assert torch.allclose(nxt[1 + masked], prompts[depth, masked], atol=1e-6)
        assert torch.allclose(nxt[0], out[0])  # class token never replaced
        assert torch.allclose(nxt[2:], out[2:])  # unmasked patches pass through
        assert not torch.allclose(out[1 + masked], prompts[depth, masked], atol=1e-3)
    assert torch.equal(seen["in3"], seen["out2"])


def test_frozen_clip_puts_gradient_only_on_prompts(tiny_clip):
    encoder = MaskedVisionEncoder(create_clip("ovseg-tiny-vit").visual, prompt_depth=3)
    encoder.freeze_clip()
    size = encoder.image_size
    mask = torch.zeros(2, size, size)
    mask[:, size // 4 :, size // 4 :] = 1
    encoder(torch.randn(2, 3, size, size), mask).pow(2).sum().backward()
    assert encoder.mask_prompts.grad is not None and encoder.mask_prompts.grad.abs().sum() > 0
    for name, param in encoder.visual.named_parameters():
        assert param.grad is None, name
    # trained together: CLIP weights get gradients too
    joint = MaskedVisionEncoder(create_clip("ovseg-tiny-vit").visual, prompt_depth=3)
    joint(torch.randn(2, 3, size, size), mask).sum().backward()
    assert joint.visual.conv1.weight.grad is not None and joint.mask_prompts.grad is not None


def test_bad_prompt_depth_is_refused(tiny_clip):
    with pytest.raises(ValueError, match="prompt_depth"):
        MaskedVisionEncoder(tiny_clip.visual, prompt_depth=99)
