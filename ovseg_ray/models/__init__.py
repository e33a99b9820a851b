"""Model math in plain PyTorch: masked CLIP encoder, region crops, text embeddings, MaskFormer, ensemble."""
