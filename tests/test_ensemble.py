"""Ensemble and fusion against hand-computed numbers (issue 2, acceptance 5)."""

from __future__ import annotations

import math

import pytest
import torch

from ovseg_ray.models.ensemble import (
    clip_probs,
    ensemble_probs,
    maskformer_probs,
    semantic_labels,
    semantic_scores,
)

P_MF = torch.tensor([[0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
P_CLIP = torch.tensor([[0.1, 0.9], [0.7, 0.3]])  # rows for queries 0 and 2; query 1 has an empty mask
VALID = torch.tensor([True, False, True])


def test_geometric_ensemble_by_hand():
    got = ensemble_probs(P_MF, P_CLIP, VALID, lam=0.5)
    expected = torch.tensor([
        [math.sqrt(0.6 * 0.1), math.sqrt(0.4 * 0.9)],
        [0.2, 0.8],  # no valid mask: the MaskFormer probability is kept
        [math.sqrt(0.5 * 0.7), math.sqrt(0.5 * 0.3)],
    ])
    assert torch.allclose(got, expected, atol=1e-6)
    got = ensemble_probs(P_MF, P_CLIP, VALID, lam=0.7)
    assert torch.allclose(got[0], torch.tensor([0.6**0.3 * 0.1**0.7, 0.4**0.3 * 0.9**0.7]), atol=1e-6)


def test_lambda_zero_is_maskformer_only_and_one_is_clip_only():
    assert torch.equal(ensemble_probs(P_MF, P_CLIP, VALID, lam=0.0), P_MF)
    clip_only = ensemble_probs(P_MF, P_CLIP, VALID, lam=1.0)
    assert torch.allclose(clip_only, torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.7, 0.3]]))


def test_ensemble_refuses_bad_lambda_and_row_count():
    with pytest.raises(ValueError, match="lambda"):
        ensemble_probs(P_MF, P_CLIP, VALID, lam=1.5)
    with pytest.raises(ValueError, match="valid"):
        ensemble_probs(P_MF, P_CLIP[:1], VALID, lam=0.5)


def test_maskformer_probs_drop_no_object_after_softmax():
    # unit vectors: query 0 aligned with class 0, query 1 with the no-object embedding
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    no_object = torch.tensor([[0.0, 0.0, 2.0]])
    queries = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    got = maskformer_probs(queries, text, no_object, temperature=1.0)
    e = math.e
    assert torch.allclose(got[0], torch.tensor([e / (e + 2), 1 / (e + 2)]), atol=1e-6)
    assert torch.allclose(got[1], torch.tensor([1 / (e + 2), 1 / (e + 2)]), atol=1e-6)


def test_clip_probs_softmax_over_classes_only():
    text = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # normalised inside
    regions = torch.tensor([[2.0, 0.0]])
    got = clip_probs(regions, text, temperature=2.0)
    assert torch.allclose(got, torch.tensor([[math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]]))


def test_fusion_sums_probability_times_sigmoid_mask():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    big = 20.0  # sigmoid(20) ~ 1, sigmoid(-20) ~ 0
    logits = torch.tensor([
        [[big, big], [0.0, -big]],
        [[-big, 0.0], [big, big]],
    ])
    scores = semantic_scores(probs, logits)
    s = torch.sigmoid(torch.tensor(big)).item()
    n = 1 - s
    expected_00 = [0.9 * s + 0.2 * n, 0.1 * s + 0.8 * n]
    expected_01 = [0.9 * s + 0.2 * 0.5, 0.1 * s + 0.8 * 0.5]
    expected_10 = [0.9 * 0.5 + 0.2 * s, 0.1 * 0.5 + 0.8 * s]
    assert torch.allclose(scores[:, 0, 0], torch.tensor(expected_00), atol=1e-6)
    assert torch.allclose(scores[:, 0, 1], torch.tensor(expected_01), atol=1e-6)
    assert torch.allclose(scores[:, 1, 0], torch.tensor(expected_10), atol=1e-6)
    assert semantic_labels(probs, logits).tolist() == [[0, 0], [1, 1]]


def test_fusion_in_row_bands_equals_upsample_then_argmax():
    torch.manual_seed(0)
    probs = torch.rand(7, 5)
    logits = torch.randn(7, 33, 9) * 3
    one_shot = semantic_scores(probs, logits).argmax(0)
    assert torch.equal(semantic_labels(probs, logits, max_chunk_elements=100), one_shot)
    for size in [(70, 20), (50, 31), (20, 5)]:
        upsampled = torch.nn.functional.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        banded = semantic_labels(probs, logits, output_size=size, max_chunk_elements=300)
        full = semantic_scores(probs, upsampled).argmax(0)
        assert torch.equal(banded, full)
        assert torch.equal(semantic_labels(probs, logits, output_size=size), banded)
