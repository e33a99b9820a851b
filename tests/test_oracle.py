"""The paper's oracle analysis (issue 14): ground-truth masks classified by CLIP, and MaskFormer
proposals labelled with the ground-truth class they overlap best."""

from __future__ import annotations

import numpy as np
import torch

from ovseg_ray.inference import Segmenter
from ovseg_ray.models.ovseg import build_model

CLASSES = ["sky", "grass", "boat", "road"]


def _truth(h: int = 96, w: int = 128) -> np.ndarray:
    truth = np.zeros((h, w), np.int64)
    truth[h // 2:] = 1
    truth[20:50, 30:70] = 2
    truth[:, :5] = -1  # ignore
    return truth


def test_oracle_masks_give_each_ground_truth_region_its_clip_class(tiny_model):
    segmenter = Segmenter(tiny_model)
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    truth = _truth()
    labels = segmenter.oracle_masks(image, truth, CLASSES)
    resized = segmenter.resize_for_model(image)
    small = torch.nn.functional.interpolate(torch.from_numpy(truth).float()[None, None], size=resized.shape[-2:],
                                            mode="nearest")[0, 0].long()
    masks = torch.stack([small == c for c in (0, 1, 2)])
    embeddings, valid = segmenter.embed_regions(resized, masks)
    expected = segmenter.clip_probs(embeddings, CLASSES).argmax(1).tolist()
    assert valid.all()
    for region, c in zip(expected, (0, 1, 2)):
        assert (labels[truth == c] == region).all()


def test_oracle_labels_with_proposals_equal_to_the_truth_reproduce_it():
    """Proposals that are exactly the ground-truth regions (logits +-12) get their own classes: the map
    is the truth itself wherever it is labelled; an all-ignore proposal is left out."""
    model = build_model("tiny")
    truth = _truth()
    segmenter = Segmenter(model)
    size = segmenter.resize_for_model(np.zeros((96, 128, 3), np.uint8)).shape[-2:]
    small = torch.nn.functional.interpolate(torch.from_numpy(truth).float()[None, None], size=size,
                                            mode="nearest")[0, 0]
    logits = torch.stack([torch.where(small == c, 12.0, -12.0) for c in (0, 1, 2, -1)])
    out = model.maskformer.propose(torch.zeros(3, *size))

    def exact(image):
        return {"class_embeddings": out["class_embeddings"][:4], "mask_logits": logits}

    model.maskformer.propose = exact
    model.maskformer.propose_many = lambda images, *args, **kwargs: [exact(image) for image in images]
    labels = segmenter.oracle_labels(np.zeros((96, 128, 3), np.uint8), truth, CLASSES, mask_threshold=0.5)
    labelled = truth >= 0
    inner = np.zeros_like(labelled)
    inner[2:-2, 7:-2] = True  # away from the borders where the bilinear resize blends regions
    assert (labels[labelled & inner] == truth[labelled & inner]).mean() > 0.97
