"""Region preprocessing: box, crop, fill colour, resize, normalisation (issue 2, acceptance 4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovseg_ray.models.clip import CLIP_MEAN, CLIP_STD
from ovseg_ray.models.regions import RegionPreprocessor, mask_boxes

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def _image(h: int = 8, w: int = 10) -> torch.Tensor:
    values = torch.arange(3 * h * w, dtype=torch.float32).view(3, h, w)
    return values % 256


def test_boxes_are_tight_and_empty_masks_flagged():
    masks = torch.zeros(3, 8, 10, dtype=torch.bool)
    masks[0, 2:6, 3:7] = True
    masks[2, 7, 9] = True
    boxes, valid = mask_boxes(masks)
    assert valid.tolist() == [True, False, True]
    assert boxes[0].tolist() == [3, 2, 7, 6]
    assert boxes[2].tolist() == [9, 7, 10, 8]


def test_crop_at_native_size_is_exact_hand_computation():
    """A 4x4 box resized to 4x4: region pixels are the image's, normalised; others are CLIP's mean."""
    image = _image()
    mask = torch.zeros(1, 8, 10, dtype=torch.bool)
    mask[0, 2:6, 3:7] = True
    mask[0, 2, 3] = False  # an L-shaped hole inside the box
    mask[0, 3, 3] = False
    batch = RegionPreprocessor(size=4, interpolation="bilinear")(image, mask)
    assert batch.valid.tolist() == [True]
    assert batch.boxes.tolist() == [[3, 2, 7, 6]]
    crop = image[:, 2:6, 3:7]
    crop_mask = mask[0, 2:6, 3:7].float()
    expected = (crop / 255.0 - MEAN) / STD * crop_mask
    assert torch.allclose(batch.images[0], expected, atol=1e-5)
    assert torch.equal(batch.masks[0, 0], crop_mask)
    # the filled pixels, un-normalised, are exactly CLIP's mean colour
    unnormalised = batch.images[0] * STD + MEAN
    assert torch.allclose(unnormalised[:, 0, 0], torch.tensor(CLIP_MEAN), atol=1e-6)


def test_upsampled_crop_matches_interpolate_and_nearest_mask():
    image = _image()
    mask = torch.zeros(2, 8, 10, dtype=torch.bool)
    mask[0, 2:6, 3:7] = True
    mask[0, 5, 6] = False
    batch = RegionPreprocessor(size=8, interpolation="bilinear")(image, mask)
    assert batch.valid.tolist() == [True, False]  # the empty mask is dropped and reported
    assert len(batch) == 1
    # nearest x2: output pixel (i, j) takes crop pixel (i // 2, j // 2)
    crop_mask = mask[0, 2:6, 3:7]
    hand = crop_mask.repeat_interleave(2, 0).repeat_interleave(2, 1).float()
    assert torch.equal(batch.masks[0, 0], hand)
    resized = F.interpolate(image[None, :, 2:6, 3:7], size=(8, 8), mode="bilinear", align_corners=False)[0]
    expected = (resized / 255.0 - MEAN) / STD * hand
    assert torch.allclose(batch.images[0], expected, atol=1e-4)


def test_bicubic_equals_interpolate_for_a_full_image_box_and_many_masks_at_once():
    torch.manual_seed(0)
    image = torch.rand(3, 37, 53) * 255
    masks = torch.ones(5, 37, 53, dtype=torch.bool)
    batch = RegionPreprocessor(size=24, interpolation="bicubic")(image, masks)
    resized = F.interpolate(image[None], size=(24, 24), mode="bicubic", align_corners=False)[0]
    expected = (resized / 255.0 - MEAN) / STD
    assert batch.images.shape == (5, 3, 24, 24)
    for k in range(5):
        assert torch.allclose(batch.images[k], expected, atol=1e-4)


def test_all_masks_empty_gives_empty_batch():
    batch = RegionPreprocessor(size=16)(_image(), torch.zeros(3, 8, 10, dtype=torch.bool))
    assert len(batch) == 0 and batch.valid.tolist() == [False, False, False]
    assert batch.images.shape == (0, 3, 16, 16)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="interpolation"):
        RegionPreprocessor(size=16, interpolation="lanczos")
    with pytest.raises(ValueError, match="differ in size"):
        RegionPreprocessor(size=16)(_image(), torch.ones(1, 5, 5, dtype=torch.bool))
