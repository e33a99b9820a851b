"""Mask prompt tuning on a stock open_clip VisionTransformer (OVSeg, section 3.3).

Patch tokens whose pixels are all masked are replaced by learnable prompts:
``T * M + P[0] * (1 - M)`` right after the patch embedding, and again with ``P[d]`` after
transformer blocks ``1 .. depth-1``. The class token is never replaced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint


class MaskedVisionEncoder(nn.Module):
    """Wraps ``clip.visual`` (not a copy: the same module) and adds mask prompts.

    Args:
        visual: an open_clip ``VisionTransformer`` with token pooling (OpenAI-style ViT).
        prompt_depth: number of prompt sets; 0 disables mask prompts entirely.
    """

    def __init__(self, visual: VisionTransformer, prompt_depth: int = 3):
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise TypeError(f"mask prompts need an open_clip VisionTransformer, got {type(visual).__name__}")
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("mask prompts are not supported for attention-pooled vision towers")
        if not isinstance(visual.patch_dropout, nn.Identity):
            raise ValueError("mask prompts need patch_dropout disabled (tokens must stay aligned with patches)")
        num_blocks = len(visual.transformer.resblocks)
        if not 0 <= prompt_depth <= num_blocks:
            raise ValueError(f"prompt_depth must be between 0 and {num_blocks}, got {prompt_depth}")
        self.visual = visual
        self.prompt_depth = prompt_depth
        grid_h, grid_w = visual.grid_size
        width = visual.conv1.out_channels
        if prompt_depth > 0:
            self.mask_prompts = nn.Parameter(torch.empty(prompt_depth, grid_h * grid_w, width))
            nn.init.normal_(self.mask_prompts, std=0.02)
        else:
            self.register_parameter("mask_prompts", None)

    @property
    def image_size(self) -> int:
        return int(self.visual.image_size[0])

    @property
    def output_dim(self) -> int:
        return int(self.visual.output_dim)

    def patch_keep(self, pixel_masks: torch.Tensor) -> torch.Tensor:
        """(B, N, 1) with 1 where a patch has at least one unmasked (foreground) pixel."""
        if pixel_masks.dim() == 3:
            pixel_masks = pixel_masks.unsqueeze(1)
        patch_h, patch_w = self.visual.patch_size
        keep = F.max_pool2d(pixel_masks.float(), kernel_size=(patch_h, patch_w), stride=(patch_h, patch_w))
        return keep.flatten(1).unsqueeze(-1)

    def _substitute(self, tokens: torch.Tensor, keep: torch.Tensor, depth: int) -> torch.Tensor:
        prompt = self.mask_prompts[depth].to(tokens.dtype).unsqueeze(0)
        return tokens * keep + prompt * (1.0 - keep)

    def forward(self, images: torch.Tensor, pixel_masks: torch.Tensor | None = None) -> torch.Tensor:
        """Image embeddings (B, output_dim), unnormalised like ``encode_image``.

        ``pixel_masks`` is (B, H, W) or (B, 1, H, W), 1 = region pixel, 0 = masked out.
        Without masks (or with ``prompt_depth == 0``) this is exactly open_clip's ``encode_image``.
        """
        visual = self.visual
        tokens = visual.conv1(images)
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, N, width)
        keep = None
        if pixel_masks is not None and self.mask_prompts is not None:
            keep = self.patch_keep(pixel_masks).to(tokens.dtype)
            tokens = self._substitute(tokens, keep, 0)
        cls = visual.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        x = torch.cat([cls, tokens], dim=1) + visual.positional_embedding.to(tokens.dtype)
        x = visual.patch_dropout(x)
        x = visual.ln_pre(x)

        transformer = visual.transformer
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        for index, block in enumerate(transformer.resblocks):
            if transformer.grad_checkpointing and self.training:
                x = checkpoint(block, x, None, None, None, use_reentrant=False)
            else:
                x = block(x)
            depth = index + 1
            if keep is not None and depth < self.prompt_depth:
                if transformer.batch_first:
                    x = torch.cat([x[:, :1], self._substitute(x[:, 1:], keep, depth)], dim=1)
                else:
                    patches = self._substitute(x[1:].transpose(0, 1), keep, depth).transpose(0, 1)
                    x = torch.cat([x[:1], patches], dim=0)
        if not transformer.batch_first:
            x = x.transpose(0, 1)

        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled

    def freeze_clip(self) -> None:
        """Train prompts only: every CLIP weight of the tower stops receiving gradients."""
        for param in self.visual.parameters():
            param.requires_grad_(False)
        if self.mask_prompts is not None:
            self.mask_prompts.requires_grad_(True)
