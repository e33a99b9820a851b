"""Region preprocessing: the official crop (box, fill at source resolution, normalise, resize the crop
alone) held against a per-mask reference loop and hand computation (issue 11, rule 4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from official_reference import regions_loop
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
    for mode in ("bilinear", "bicubic"):
        batch = RegionPreprocessor(size=4, interpolation=mode)(image, mask)
        assert batch.valid.tolist() == [True]
        assert batch.boxes.tolist() == [[3, 2, 7, 6]]
        crop = image[:, 2:6, 3:7]
        crop_mask = mask[0, 2:6, 3:7].float()
        expected = (crop / 255.0 - MEAN) / STD * crop_mask
        assert torch.allclose(batch.images[0], expected, atol=1e-5)
        assert torch.equal(batch.masks[0, 0], crop_mask)
        unnormalised = batch.images[0] * STD + MEAN  # the filled pixels are exactly CLIP's mean colour
        assert torch.allclose(unnormalised[:, 0, 0], torch.tensor(CLIP_MEAN), atol=1e-6)


def test_fill_happens_before_the_resize_at_source_resolution():
    """Upsampling a 1x2 crop whose right pixel is outside the mask: the output blends region and fill
    (0 after normalisation) by the bilinear weights: hand computation of F.interpolate's taps."""
    image = torch.full((3, 3, 4), 200.0)
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[0, 1, 1] = True
    mask[0, 1, 2] = False
    mask[0, 0, 2] = True  # box rows 0-1, columns 1-2: a 2x2 crop, its pixel (0, 0) and (1, 1) outside
    batch = RegionPreprocessor(size=4, interpolation="bilinear")(image, mask)
    value = (200.0 / 255.0 - MEAN) / STD  # (3, 1, 1), normalised region pixel
    crop = torch.zeros(3, 2, 2)
    crop[:, 0, 1] = value[:, 0, 0]
    crop[:, 1, 0] = value[:, 0, 0]
    # 2 -> 4, align_corners=False: source coordinates -0.25 (clamped to 0), 0.25, 0.75, 1.25 (last: 1)
    taps = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    expected = torch.einsum("oy,cyx,px->cop", taps, crop, taps)
    assert torch.allclose(batch.images[0], expected, atol=1e-6)
    # Output pixel (1, 1) takes its nearest mask value from crop pixel (0, 0), outside the mask: filling
    # after the resize (the old order) gave it exactly 0; the official order blends the neighbours in.
    assert batch.masks[0, 0, 1, 1] == 0 and batch.images[0, 0, 1, 1].abs() > 0.1


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_equals_the_per_mask_reference_loop(mode):
    """Masks touching the box edge and the image border, one pixel, thin strips, odd sizes, an empty mask."""
    torch.manual_seed(0)
    image = torch.rand(3, 61, 87) * 255
    masks = torch.zeros(7, 61, 87, dtype=torch.bool)
    masks[0, 3:40, 5:70] = torch.rand(37, 65) > 0.3
    masks[1] = True  # the whole image
    masks[2, 10, 20] = True  # one pixel
    masks[4, 50:61, 80:87] = True  # the bottom-right corner
    masks[5, 20:23, 1:86] = True  # a thin strip: upsampled 75x along y
    masks[6, 0:61:2, 40] = True  # a dotted column: box 1 pixel wide
    reference, reference_masks, valid = regions_loop(image, masks, 32, mode)
    batch = RegionPreprocessor(size=32, interpolation=mode)(image, masks)
    assert batch.valid.tolist() == valid.tolist() == [True, True, True, False, True, True, True]
    assert (batch.images - reference).abs().max() < 1e-4
    assert torch.equal(batch.masks, reference_masks)


def test_exactly_one_region_and_chunking_do_not_change_results():
    torch.manual_seed(1)
    image = torch.rand(3, 45, 33) * 255
    masks = torch.rand(1, 45, 33) > 0.5
    reference, reference_masks, _ = regions_loop(image, masks, 24)
    batch = RegionPreprocessor(size=24)(image, masks)
    assert len(batch) == 1 and (batch.images - reference).abs().max() < 1e-4
    assert torch.equal(batch.masks, reference_masks)
    many = torch.rand(20, 45, 33) > 0.7
    whole = RegionPreprocessor(size=24)(image, many)
    tiny_budget = RegionPreprocessor(size=24, max_chunk_elements=1)(image, many)  # one mask per chunk
    assert torch.allclose(whole.images, tiny_budget.images, atol=1e-6)
    assert torch.equal(whole.masks, tiny_budget.masks)


def test_nearest_mask_uses_float32_index_arithmetic():
    """A 5-row box resized to 224 rows: floor(dst * float32(5 / 224)), as F.interpolate's nearest."""
    image = _image(20, 20)
    mask = torch.zeros(1, 20, 20, dtype=torch.bool)
    mask[0, 3:8, 2:9] = torch.tensor([[1, 0, 1, 0, 1, 0, 1]] * 5, dtype=torch.bool)
    batch = RegionPreprocessor(size=224)(image, mask)
    expected = F.interpolate(mask[:, None, 3:8, 2:9].float(), size=(224, 224), mode="nearest")[0, 0]
    assert torch.equal(batch.masks[0, 0], expected)


def test_all_masks_empty_gives_empty_batch():
    batch = RegionPreprocessor(size=16)(_image(), torch.zeros(3, 8, 10, dtype=torch.bool))
    assert len(batch) == 0 and batch.valid.tolist() == [False, False, False]
    assert batch.images.shape == (0, 3, 16, 16)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="interpolation"):
        RegionPreprocessor(size=16, interpolation="lanczos")
    with pytest.raises(ValueError, match="differ in size"):
        RegionPreprocessor(size=16)(_image(), torch.ones(1, 5, 5, dtype=torch.bool))
