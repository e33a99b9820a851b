"""MaskFormer's transformer predictor with an open-vocabulary class head.

A DETR decoder turns N learned queries into per-query embeddings; ``mask_embed`` gives mask
embeddings (masks = dot product with per-pixel features) and ``class_embed`` projects each query
to CLIP's embedding space, where it is classified by cosine similarity with text embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import MLP, PositionEmbeddingSine


class DecoderLayer(nn.Module):
    """Post-norm DETR decoder layer (self-attention, cross-attention, FFN)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, memory, pos, query_pos):
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attended = self.multihead_attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout(attended))
        ffn = self.linear2(self.dropout(torch.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout(ffn))


class TransformerDecoder(nn.Module):
    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, pos, query_pos) -> torch.Tensor:
        """All layers' normalised outputs, (L, Q, B, C)."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class QueryTransformer(nn.Module):
    """Holds the decoder under ``transformer.decoder`` (MaskFormer's encoder has zero layers)."""

    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.decoder = TransformerDecoder(num_layers, d_model, nhead, dim_feedforward, dropout)
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)


class OpenVocabPredictor(nn.Module):
    def __init__(
        self,
        in_channels: int,
        embedding_dim: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 6,
        dropout: float = 0.1,
        mask_dim: int = 256,
        embed_hidden_dim: int = 1024,
        embed_layers: int = 2,
    ):
        super().__init__()
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2)
        self.transformer = QueryTransformer(dec_layers, hidden_dim, nheads, dim_feedforward, dropout)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        if in_channels != hidden_dim:
            self.input_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
            nn.init.kaiming_uniform_(self.input_proj.weight, a=1)
            nn.init.zeros_(self.input_proj.bias)
        else:
            self.input_proj = nn.Sequential()
        self.class_embed = MLP(hidden_dim, embed_hidden_dim, embedding_dim, embed_layers)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, x: torch.Tensor, mask_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: the lowest-resolution backbone map; returns query class embeddings and mask logits.

        ``class_embeddings`` (L, B, Q, E) and ``mask_logits`` (L, B, Q, H, W) for every decoder layer
        (the last one is the prediction; the others serve deep supervision).
        """
        pos = self.pe_layer(x).flatten(2).permute(2, 0, 1)  # (HW, B, C)
        memory = self.input_proj(x).flatten(2).permute(2, 0, 1)
        batch = x.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(1).expand(-1, batch, -1)
        tgt = torch.zeros_like(query_pos)
        hidden = self.transformer.decoder(tgt, memory, pos, query_pos).transpose(1, 2)  # (L, B, Q, C)
        class_embeddings = self.class_embed(hidden)
        mask_embeddings = self.mask_embed(hidden)
        mask_logits = torch.einsum("lbqc,bchw->lbqhw", mask_embeddings, mask_features)
        return {"class_embeddings": class_embeddings, "mask_logits": mask_logits}
