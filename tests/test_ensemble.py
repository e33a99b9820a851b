"""Ensemble and fusion against hand computation and the official definitions (issue 11, rules 1, 2, 7)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from official_reference import demo_labels, fused_scores, official_ensemble
from ovseg_ray.models.ensemble import (
    UNLABELLED,
    clip_probs,
    demo_selection,
    ensemble_probs,
    fused_labels,
    maskformer_probs,
    semantic_scores,
)

P_MF = torch.tensor([[0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
P_CLIP = torch.tensor([[0.1, 0.9], [0.7, 0.3]])  # rows for queries 0 and 2; query 1 has an empty mask
VALID = torch.tensor([True, False, True])


def test_geometric_ensemble_by_hand_with_a_clip_term_of_one_for_empty_masks():
    got, queries = ensemble_probs(P_MF, P_CLIP, VALID, lam=0.5)
    expected = torch.tensor([
        [math.sqrt(0.6 * 0.1), math.sqrt(0.4 * 0.9)],
        [math.sqrt(0.2), math.sqrt(0.8)],  # no region: p_mf ** (1 - lambda), as the official code
        [math.sqrt(0.5 * 0.7), math.sqrt(0.5 * 0.3)],
    ])
    assert torch.allclose(got, expected, atol=1e-6) and queries.tolist() == [0, 1, 2]
    got, _ = ensemble_probs(P_MF, P_CLIP, VALID, lam=0.7)
    assert torch.allclose(got[0], torch.tensor([0.6**0.3 * 0.1**0.7, 0.4**0.3 * 0.9**0.7]), atol=1e-6)
    assert torch.allclose(got[1], torch.tensor([0.2**0.3, 0.8**0.3]), atol=1e-6)
    reference, _ = official_ensemble(P_MF, P_CLIP, VALID, 0.7)
    assert torch.allclose(got, reference, atol=1e-7)


def test_lambda_zero_is_maskformer_only_and_one_is_the_official_clip_only():
    probs, queries = ensemble_probs(P_MF, P_CLIP, VALID, lam=0.0)
    assert torch.equal(probs, P_MF) and queries.tolist() == [0, 1, 2]
    probs, queries = ensemble_probs(P_MF, P_CLIP, VALID, lam=1.0)
    reference, kept = official_ensemble(P_MF, P_CLIP, VALID, weight=0.0)  # the official "CLIP only"
    assert torch.equal(probs, reference) and queries.tolist() == kept.nonzero().flatten().tolist() == [0, 2]


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
    scores = semantic_scores(probs, logits.sigmoid())
    s = torch.sigmoid(torch.tensor(big)).item()
    n = 1 - s
    expected_00 = [0.9 * s + 0.2 * n, 0.1 * s + 0.8 * n]
    expected_01 = [0.9 * s + 0.2 * 0.5, 0.1 * s + 0.8 * 0.5]
    expected_10 = [0.9 * 0.5 + 0.2 * s, 0.1 * 0.5 + 0.8 * s]
    assert torch.allclose(scores[:, 0, 0], torch.tensor(expected_00), atol=1e-6)
    assert torch.allclose(scores[:, 0, 1], torch.tensor(expected_01), atol=1e-6)
    assert torch.allclose(scores[:, 1, 0], torch.tensor(expected_10), atol=1e-6)
    assert fused_labels(probs, logits).tolist() == [[0, 0], [1, 1]]


def test_resizing_scores_is_not_resizing_logits():
    """Between two pixels, query 0's sigmoid averages 0.56 and query 1's 0.73 (official: class 1), while
    the sigmoid of the averaged logits is 0.98 against 0.73 (the resize-logits order: class 0)."""
    logits = torch.tensor([[[10.0, -2.0]], [[1.0, 1.0]]])  # (Q=2, 1, 2)
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    size = (1, 3)
    official = fused_scores(probs, logits.sigmoid(), size).argmax(0)
    old = semantic_scores(probs, F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
                          .sigmoid()).argmax(0)
    got = fused_labels(probs, logits, output_size=size)
    assert got[0, 1] == official[0, 1] == 1 and old[0, 1] == 0
    assert torch.equal(got, official)


def _near_tie_free(scores: torch.Tensor, margin: float = 1e-5) -> torch.Tensor:
    top = scores.topk(2, dim=0).values
    return (top[0] - top[1]) > margin


@pytest.mark.parametrize("size", [(70, 20), (50, 31), (20, 5), (33, 9), (101, 37)])
def test_banded_fusion_equals_the_whole_map_interpolate(size):
    """Output bands computed from the processing-size rows they need equal one F.interpolate of the
    whole (C, h, w) score map (official sem_seg_postprocess), for up- and downsampling, odd sizes."""
    torch.manual_seed(0)
    probs = torch.rand(7, 5)
    logits = torch.randn(7, 33, 9) * 3
    reference = fused_scores(probs, logits.sigmoid(), size)
    decided = _near_tie_free(reference)
    for budget in (50, 300, 10_000_000):  # one output row per band, a few, everything at once
        banded = fused_labels(probs, logits, output_size=size, max_chunk_elements=budget)
        assert torch.equal(banded[decided], reference.argmax(0)[decided])
        assert decided.float().mean() > 0.99


def test_same_size_fusion_is_the_argmax_of_the_sums():
    torch.manual_seed(0)
    probs = torch.rand(7, 5)
    logits = torch.randn(7, 33, 9) * 3
    one_shot = semantic_scores(probs, logits.sigmoid()).argmax(0)
    assert torch.equal(fused_labels(probs, logits, max_chunk_elements=100), one_shot)


def test_demo_selection_keeps_each_class_best_query_row():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3]])
    selected = demo_selection(probs)
    expected = torch.zeros_like(probs)
    expected[[0, 3, 2]] = probs[[0, 3, 2]]  # best query of class 0, 1, 2; query 1 loses everywhere
    assert torch.equal(selected, expected)
    # with "others" appended to a single name, "others" picks no query of its own
    two = torch.tensor([[0.9, 0.1], [0.4, 0.6]])
    assert torch.equal(demo_selection(two, skip_last_class=True), torch.tensor([[0.9, 0.1], [0.0, 0.0]]))


def test_demo_fusion_binary_masks_and_unlabelled_pixels_match_the_reference():
    torch.manual_seed(3)
    logits = torch.randn(6, 17, 23) * 4
    valid = torch.tensor([True, True, False, True, True, False])
    p_clip = torch.rand(4, 3).softmax(dim=1)
    for size in [(17, 23), (40, 51)]:
        reference = demo_labels(p_clip, valid, logits, size, 0.35, ["a", "b", "c"])
        got = fused_labels(demo_selection(p_clip), logits[valid], size, binary_threshold=0.35, blank_unlabelled=True)
        assert torch.equal(got, reference)
        assert (got == UNLABELLED).any() and (got >= 0).any()
