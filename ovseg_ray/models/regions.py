"""Region preprocessing shared by inference, mining and training (the official OVSeg crop).

For each binary mask: its tight bounding box; the image cropped to the box; at source resolution,
the crop's pixels outside the mask set to CLIP's mean colour; CLIP normalisation (the fill becomes
0); then the crop alone resized to CLIP's input size with ``F.interpolate``'s bicubic (or bilinear)
resampling, whose taps clamp to the crop's edges, never reading image pixels outside the box; the
mask crop resized with ``nearest`` (PyTorch's float32 index arithmetic). Resizing after the fill means
pixels near the mask edge blend region and fill colour, as the official code does.

All masks of an image are processed together: their crops are gathered into canvases and resized
by batched products with per-box interpolation matrices (chunks of similar box size bound the
memory). No Python loop over masks touches pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    as_bytes = masks.bool().view(torch.uint8)  # amax over bytes is several times faster than any()
    rows = as_bytes.amax(dim=2).bool()  # (Q, H)
    cols = as_bytes.amax(dim=1).bool()  # (Q, W)
    valid = rows.any(dim=1)
    height, width = masks.shape[1:]
    y0 = rows.float().argmax(dim=1)
    y1 = height - rows.flip(1).float().argmax(dim=1)
    x0 = cols.float().argmax(dim=1)
    x1 = width - cols.flip(1).float().argmax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1), valid


def nearest_taps(length: torch.Tensor, out_size: int) -> torch.Tensor:
    """(K, S) source offsets inside each box of PyTorch's ``nearest`` resize: floor(dst * (in / out)) in
    float32, as its kernel computes them."""
    scale = length.to(torch.float32).unsqueeze(1) / torch.tensor(float(out_size), dtype=torch.float32)
    dst = torch.arange(out_size, device=length.device, dtype=torch.float32).unsqueeze(0)
    src = torch.floor(dst * scale.to(length.device)).long()
    return torch.minimum(src, (length - 1).unsqueeze(1))


def _cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """(..., 4) bicubic convolution weights (a = -0.75, PyTorch's) of the taps at -1, 0, 1, 2 for ``t``."""
    a = -0.75

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return torch.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], dim=-1)


def resize_matrix(length: torch.Tensor, out_size: int, mode: str, canvas: int) -> torch.Tensor:
    """(K, S, canvas) matrices of an ``F.interpolate`` resize (align_corners=False) of each box's first
    ``length[k]`` pixels to ``out_size``: taps clamped to the box, float32 index arithmetic."""
    if mode not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {mode!r}")
    device = length.device
    scale = (length.to(torch.float32) / torch.tensor(float(out_size), dtype=torch.float32, device=device)).double()
    dst = torch.arange(out_size, device=device, dtype=torch.float64).unsqueeze(0)
    src = (scale.unsqueeze(1) * (dst + 0.5) - 0.5).float()  # rounded once, like the kernels' fused multiply-add
    last = (length - 1).view(-1, 1, 1)
    if mode == "bilinear":
        src = src.clamp(min=0)
        lo = src.long()
        t = (src - lo.float()).clamp(0, 1)
        offsets, weights = torch.stack([lo, lo + 1], dim=-1), torch.stack([1.0 - t, t], dim=-1)
    else:
        lo = torch.minimum(torch.floor(src).long(), last[..., 0])
        t = (src - lo.float()).clamp(0, 1)
        offsets, weights = lo.unsqueeze(-1) + torch.arange(-1, 3, device=device), _cubic_weights(t)
    offsets = torch.minimum(offsets.clamp(min=0), last)  # edge taps repeat the box's edge pixel
    matrix = torch.zeros(length.shape[0], out_size, canvas, device=device)
    return matrix.scatter_add_(2, offsets, weights)


def resize_filled_crops(normalized: torch.Tensor, masks: torch.Tensor, which: torch.Tensor, boxes: torch.Tensor,
                        size: int, mode: str) -> torch.Tensor:
    """(K, 3, S, S): box k of ``normalized`` (3, H, W), zero outside mask ``which[k]`` of ``masks``
    (Q, H, W) bool, resized as ``F.interpolate`` resizes that crop alone.

    The crops are gathered into one canvas each (the largest box's size), then resized by two batched
    matrix products, along x and then along y, with per-box interpolation matrices whose taps stay
    inside the box.
    """
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    heights, widths = y1 - y0, x1 - x0
    canvas_h, canvas_w = int(heights.max()), int(widths.max())
    device = boxes.device
    height, width = normalized.shape[1:]
    rows = (y0.unsqueeze(1) + torch.arange(canvas_h, device=device)).clamp(max=height - 1)
    cols = (x0.unsqueeze(1) + torch.arange(canvas_w, device=device)).clamp(max=width - 1)
    pixel = rows.unsqueeze(2) * width + cols.unsqueeze(1)  # (K, Hc, Wc) flat pixel indices
    count = boxes.shape[0]
    inside = masks.view(-1).take(pixel + (which * (height * width)).view(-1, 1, 1)).unsqueeze(1)
    crops = normalized.flatten(1).index_select(1, pixel.flatten()).view(3, count, canvas_h, canvas_w)
    crops = crops.transpose(0, 1) * inside  # (K, 3, Hc, Wc); 0 outside the mask = the fill colour
    along_x = torch.bmm(crops.reshape(count, 3 * canvas_h, canvas_w),
                        resize_matrix(widths, size, mode, canvas_w).transpose(1, 2))  # (K, 3 * Hc, S)
    along_x = along_x.view(count, 3, canvas_h, size)
    return torch.einsum("koy,kcyx->kcox", resize_matrix(heights, size, mode, canvas_h), along_x)


class RegionPreprocessor:
    """Turns an image and its binary masks into CLIP-ready masked regions."""

    def __init__(
        self,
        size: int = 224,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        interpolation: str = "bicubic",
        max_chunk_elements: int = 24_000_000,
    ):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        if size <= 0:
            raise ValueError(f"region size must be positive, got {size}")
        self.size = size
        self.interpolation = interpolation
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.max_chunk_elements = max_chunk_elements

    def __call__(self, image: torch.Tensor, masks: torch.Tensor) -> RegionBatch:
        """``image``: (3, H, W), uint8 or float in [0, 255], RGB. ``masks``: (Q, H, W) bool."""
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
        if masks.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f"masks {tuple(masks.shape[-2:])} and image {tuple(image.shape[-2:])} differ in size"
            )
        device = image.device
        masks = masks.to(device).bool().contiguous()
        boxes, valid = mask_boxes(masks)
        which = valid.nonzero().flatten()
        boxes = boxes[which]
        size = self.size
        count = boxes.shape[0]
        images = torch.empty(count, 3, size, size, device=device)
        crop_masks = torch.empty(count, 1, size, size, device=device)
        if count:
            # Outside the mask the pixel is CLIP's mean colour, i.e. exactly 0 after normalisation.
            normalized = (image.float() - self.mean.to(device) * 255.0) / (self.std.to(device) * 255.0)
            for chunk in self._chunks(boxes):
                images[chunk] = resize_filled_crops(normalized, masks, which[chunk], boxes[chunk], size,
                                                    self.interpolation)
            x0, y0, x1, y1 = boxes.unbind(dim=1)
            rows = (nearest_taps(y1 - y0, size) + y0.unsqueeze(1)).unsqueeze(2)
            cols = (nearest_taps(x1 - x0, size) + x0.unsqueeze(1)).unsqueeze(1)
            crop_masks[:, 0] = masks[which.view(-1, 1, 1), rows, cols]
        return RegionBatch(images=images, masks=crop_masks, boxes=boxes, valid=valid)

    def _chunks(self, boxes: torch.Tensor) -> list[torch.Tensor]:
        """Mask indices grouped by similar box size: each group's canvas (its largest height and width)
        wastes at most a third of its pixels on padding, and its work stays within the element budget."""
        heights, widths = (boxes[:, 3] - boxes[:, 1]).tolist(), (boxes[:, 2] - boxes[:, 0]).tolist()
        order = sorted(range(len(heights)), key=lambda i: (heights[i] * widths[i], i), reverse=True)
        size = self.size
        chunks, start = [], 0
        while start < len(order):
            first = order[start]
            tallest, widest, area, end = heights[first], widths[first], heights[first] * widths[first], start + 1
            while end < len(order):
                k = order[end]
                h, w, n = max(tallest, heights[k]), max(widest, widths[k]), end - start + 1
                padded = n * h * w
                if 3 * padded > 4 * (area + heights[k] * widths[k]) or \
                        3 * n * (2 * h * w + h * size + size * size) > self.max_chunk_elements:
                    break
                tallest, widest, area, end = h, w, area + heights[k] * widths[k], end + 1
            chunks.append(torch.tensor(order[start:end], device=boxes.device))
            start = end
        return chunks
