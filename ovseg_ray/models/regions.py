"""Region preprocessing shared by mining, training and serving.

For each binary mask: tight bounding box, crop, resize to the CLIP input size (bicubic or bilinear
for the image, nearest for the mask), background filled with CLIP's mean colour, CLIP normalisation.
All masks of an image are resampled in one ``grid_sample`` call and one gather: there is no Python
loop over masks. The fill happens after the resize, with the nearest-resized mask, so the filled
pixels are exactly the ones the mask prompts see as masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .clip import CLIP_MEAN, CLIP_STD

INTERPOLATIONS = ("bicubic", "bilinear")


@dataclass
class RegionBatch:
    """The regions of one image's masks, ready for the masked CLIP encoder."""

    images: torch.Tensor  # (K, 3, S, S) CLIP-normalised
    masks: torch.Tensor  # (K, 1, S, S) float, 1 = region pixel
    boxes: torch.Tensor  # (K, 4) x0, y0, x1, y1 in source pixels (x1, y1 exclusive)
    valid: torch.Tensor  # (Q,) bool: which input masks produced a region (empty ones did not)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def mask_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight boxes (Q, 4) as x0, y0, x1, y1 (exclusive ends) and a (Q,) flag for non-empty masks."""
    if masks.dim() != 3:
        raise ValueError(f"masks must be (Q, H, W), got shape {tuple(masks.shape)}")
    masks = masks.bool()
    rows = masks.any(dim=2)  # (Q, H)
    cols = masks.any(dim=1)  # (Q, W)
    valid = rows.any(dim=1)
    height, width = masks.shape[1:]
    y0 = rows.float().argmax(dim=1)
    y1 = height - rows.flip(1).float().argmax(dim=1)
    x0 = cols.float().argmax(dim=1)
    x1 = width - cols.flip(1).float().argmax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1), valid


def _nearest_indices(start: torch.Tensor, length: torch.Tensor, out_size: int) -> torch.Tensor:
    """(K, S) source indices of PyTorch's legacy ``nearest`` resize of each box along one axis."""
    dst = torch.arange(out_size, device=start.device, dtype=torch.float64).unsqueeze(0)
    length = length.to(torch.float64).unsqueeze(1)
    src = torch.minimum(torch.floor(dst * (length / out_size)), length - 1)
    return (src + start.to(torch.float64).unsqueeze(1)).long()


def _sample_coords(start: torch.Tensor, length: torch.Tensor, out_size: int, extent: int) -> torch.Tensor:
    """(K, S) grid_sample coordinates of an align_corners=False resize of each box along one axis.

    Coordinates are clamped to the box, so bilinear taps never leave it (as when resizing the crop).
    """
    start = start.to(torch.float64).unsqueeze(1)
    length = length.to(torch.float64).unsqueeze(1)
    dst = torch.arange(out_size, device=start.device, dtype=torch.float64).unsqueeze(0)
    src = (dst + 0.5) * (length / out_size) - 0.5
    src = torch.minimum(src.clamp(min=0), length - 1) + start
    return ((2 * src + 1) / extent - 1).float()


def resample_boxes(source: torch.Tensor, boxes: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Crop every box of a (C, H, W) float tensor and resize it to (size, size): (K, C, S, S).

    Bilinear equals ``F.interpolate`` on the crop. Bicubic taps next to the box edge read the
    neighbouring image pixels (the image border is replicated), as a resize of the whole image would.
    """
    if mode not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {mode!r}")
    height, width = source.shape[-2:]
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    gx = _sample_coords(x0, x1 - x0, size, width)  # (K, S)
    gy = _sample_coords(y0, y1 - y0, size, height)
    count = boxes.shape[0]
    grid = torch.stack(
        [gx.unsqueeze(1).expand(count, size, size), gy.unsqueeze(2).expand(count, size, size)], dim=-1
    )
    batch = source.float().unsqueeze(0).expand(count, -1, -1, -1)
    return F.grid_sample(batch, grid, mode=mode, padding_mode="border", align_corners=False)


def resample_masks_nearest(masks: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop box k of mask k (K, H, W) and resize it, nearest neighbour: returns (K, S, S) bool."""
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    rows = _nearest_indices(y0, y1 - y0, size).unsqueeze(2)
    cols = _nearest_indices(x0, x1 - x0, size).unsqueeze(1)
    index = torch.arange(masks.shape[0], device=masks.device).view(-1, 1, 1)
    return masks[index, rows, cols].bool()


class RegionPreprocessor:
    """Turns an image and its binary masks into CLIP-ready masked regions."""

    def __init__(
        self,
        size: int = 224,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        interpolation: str = "bicubic",
    ):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        if size <= 0:
            raise ValueError(f"region size must be positive, got {size}")
        self.size = size
        self.interpolation = interpolation
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, image: torch.Tensor, masks: torch.Tensor) -> RegionBatch:
        """``image``: (3, H, W), uint8 or float in [0, 255], RGB. ``masks``: (Q, H, W) bool."""
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
        if masks.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f"masks {tuple(masks.shape[-2:])} and image {tuple(image.shape[-2:])} differ in size"
            )
        boxes, valid = mask_boxes(masks)
        boxes = boxes[valid]
        device = image.device
        mean = self.mean.to(device)
        std = self.std.to(device)
        size = self.size
        if boxes.shape[0] == 0:
            return RegionBatch(
                images=torch.zeros(0, 3, size, size, device=device),
                masks=torch.zeros(0, 1, size, size, device=device),
                boxes=boxes,
                valid=valid,
            )
        regions = resample_boxes(image, boxes, size, self.interpolation)
        crop_masks = resample_masks_nearest(masks[valid], boxes, size).unsqueeze(1).float()
        # Outside the mask the pixel becomes CLIP's mean colour, i.e. exactly 0 after normalisation.
        regions.sub_(mean * 255.0).div_(std * 255.0).mul_(crop_masks)
        return RegionBatch(images=regions, masks=crop_masks, boxes=boxes, valid=valid)
