"""MaskFormer's matcher and loss against brute force and hand computation (issue 13, acceptance 1)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ovseg_ray.training.maskformer_loss import (
    LossWeights,
    Targets,
    layer_losses,
    maskformer_loss,
    match,
    pairwise_costs,
    semantic_targets,
)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _focal(logit: float, target: float) -> float:
    p = _sigmoid(logit)
    ce = -math.log(p) if target else -math.log(1 - p)
    p_t = p if target else 1 - p
    alpha_t = 0.25 if target else 0.75
    return alpha_t * ce * (1 - p_t) ** 2


def test_targets_are_one_mask_per_class_present_without_ignore():
    labels = torch.tensor([[[3, 3, 255], [0, 3, 255]]])
    (target,) = semantic_targets(labels)
    assert target.classes.tolist() == [0, 3]
    assert target.masks.tolist() == [[[0, 0, 0], [1, 0, 0]], [[1, 1, 0], [0, 1, 0]]]
    assert target.valid.tolist() == [[1, 1, 0], [1, 1, 0]]


@pytest.mark.parametrize("seed", range(6))
def test_matcher_equals_brute_force_over_all_assignments(seed):
    generator = torch.Generator().manual_seed(seed)
    queries, classes = 5, 4
    labels = torch.randint(0, classes, (1, 6, 6), generator=generator)
    labels[0, 0, :3] = 255
    class_logits = torch.randn(1, queries, classes + 1, generator=generator) * 2
    mask_logits = torch.randn(1, queries, 3, 3, generator=generator) * 3  # predictions at a lower resolution
    targets = semantic_targets(labels)
    cost = pairwise_costs(class_logits[0], mask_logits[0], targets[0], LossWeights()).numpy()
    rows, cols = match(class_logits, mask_logits, targets, LossWeights())[0]
    found = cost[rows, cols].sum()
    k = cost.shape[1]
    best = min(sum(cost[q, t] for t, q in enumerate(chosen)) for chosen in itertools.permutations(range(queries), k))
    assert len(rows) == k == len(set(rows.tolist()))
    assert found == pytest.approx(best, abs=1e-9)


def test_matching_cost_by_hand():
    """One query, one target on a 1x2 map (one pixel labelled): class, focal and dice costs."""
    class_logits = torch.tensor([[0.5, -0.5, 0.0]])
    mask_logits = torch.tensor([[[1.5, -2.0]]])
    target = Targets(torch.tensor([1]), torch.tensor([[[1.0, 0.0]]]), torch.tensor([[1.0, 0.0]]))
    cost = pairwise_costs(class_logits, mask_logits, target, LossWeights())
    p_class = math.exp(-0.5) / (math.exp(0.5) + math.exp(-0.5) + 1)
    focal = _focal(1.5, 1)  # the second pixel is ignore: left out, and the mean is over 1 pixel
    p = _sigmoid(1.5)
    dice = 1 - (2 * p + 1) / (p + 1 + 1)
    assert float(cost) == pytest.approx(-p_class + 20 * focal + dice, rel=1e-6)


def _two_by_two_case():
    """2 queries, 2 classes (+ no object), labels at the prediction's resolution (no resize)."""
    labels = torch.tensor([[[0, 0], [1, 255]]])
    class_logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]]])  # query 0 likes class 0, query 1 class 1
    mask_logits = torch.tensor([[[[2.0, 1.0], [-1.0, 3.0]], [[-2.0, -1.0], [1.5, -3.0]]]])
    return class_logits, mask_logits, labels


def test_each_loss_term_by_hand():
    class_logits, mask_logits, labels = _two_by_two_case()
    targets = semantic_targets(labels)
    assert [m.tolist() for m in match(class_logits, mask_logits, targets, LossWeights())[0]] == [[0, 1], [0, 1]]
    terms = layer_losses(class_logits, mask_logits, targets, LossWeights(), num_masks=2.0)

    def log_softmax(row, index):
        return row[index] - math.log(sum(math.exp(v) for v in row))

    ce = -(log_softmax([2.0, 0.0, -1.0], 0) + log_softmax([0.0, 1.0, 0.5], 1)) / 2  # weights 1, 1
    assert float(terms["ce"]) == pytest.approx(ce, rel=1e-6)
    valid = [(0, 0), (0, 1), (1, 0)]  # pixel (1, 1) is ignore
    goals = [[[1, 1], [0, 0]], [[0, 0], [1, 0]]]
    focal = dice = 0.0
    for q in range(2):
        logits = mask_logits[0, q]
        focal += sum(_focal(float(logits[i, j]), goals[q][i][j]) for i, j in valid) / 3
        probs = {(i, j): _sigmoid(float(logits[i, j])) for i, j in valid}
        inter = sum(probs[(i, j)] * goals[q][i][j] for i, j in valid)
        dice += 1 - (2 * inter + 1) / (sum(probs.values()) + sum(goals[q][i][j] for i, j in valid) + 1)
    assert float(terms["mask"]) == pytest.approx(focal / 2, rel=1e-6)
    assert float(terms["dice"]) == pytest.approx(dice / 2, rel=1e-6)


def test_unmatched_queries_learn_no_object_with_weight_a_tenth():
    class_logits, mask_logits, labels = _two_by_two_case()
    extra = torch.tensor([[[0.3, -0.2, 0.9]]])
    class_logits = torch.cat([class_logits, extra], dim=1)
    mask_logits = torch.cat([mask_logits, torch.full((1, 1, 2, 2), -5.0)], dim=1)
    terms = layer_losses(class_logits, mask_logits, semantic_targets(labels), LossWeights(), num_masks=2.0)

    def nll(row, index):
        return -(row[index] - math.log(sum(math.exp(v) for v in row)))

    expected = (nll([2.0, 0.0, -1.0], 0) + nll([0.0, 1.0, 0.5], 1) + 0.1 * nll([0.3, -0.2, 0.9], 2)) / 2.1
    assert float(terms["ce"]) == pytest.approx(expected, rel=1e-6)


def test_total_is_the_weighted_sum_over_every_decoder_layer():
    class_logits, mask_logits, labels = _two_by_two_case()
    layers_c = torch.stack([class_logits, class_logits.flip(1)])
    layers_m = torch.stack([mask_logits, mask_logits * 0.5])
    out = maskformer_loss(layers_c, layers_m, labels)
    expected = 0.0
    for layer in range(2):
        terms = layer_losses(layers_c[layer], layers_m[layer], semantic_targets(labels), LossWeights(), 2.0)
        expected += float(terms["ce"] + 20 * terms["mask"] + terms["dice"])
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-6)


def test_ignore_pixels_contribute_nothing():
    """Any prediction at ignore pixels leaves the matching, the loss and its gradient unchanged."""
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (2, 8, 8), generator=generator)
    labels[0, :, 5:] = 255
    labels[1, 2:4] = 255
    class_logits = torch.randn(2, 2, 6, 4, generator=generator)
    base = torch.randn(2, 2, 6, 8, 8, generator=generator)
    ignore = (labels == 255)[None, :, None].expand_as(base)
    noisy = torch.where(ignore, torch.randn(base.shape, generator=generator) * 10, base)
    first, second = base.clone().requires_grad_(), noisy.clone().requires_grad_()
    loss_a = maskformer_loss(class_logits, first, labels)["loss"]
    loss_b = maskformer_loss(class_logits, second, labels)["loss"]
    assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-6)
    loss_a.backward()
    loss_b.backward()
    assert torch.allclose(first.grad, second.grad, atol=1e-7)
    assert (first.grad[ignore] == 0).all()


def test_an_image_without_labelled_pixels_has_only_no_object_targets():
    labels = torch.full((1, 4, 4), 255)
    out = maskformer_loss(torch.zeros(1, 1, 3, 5), torch.zeros(1, 1, 3, 2, 2), labels)
    assert float(out["mask"]) == 0 and float(out["dice"]) == 0
    assert float(out["ce"]) == pytest.approx(math.log(5), rel=1e-6)  # uniform logits, target "no object"
    assert np.isfinite(float(out["loss"]))
