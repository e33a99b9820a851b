"""Training objectives, checked against hand computation (no Ray)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ovseg_ray.training.losses import (
    contrastive_loss,
    duplicate_noun_mask,
    vocabulary_correct,
    vocabulary_logits,
    vocabulary_loss,
)
from spawned_ranks import run_ranks


def _unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def _cross_entropy(logits: list[float], target: int) -> float:
    finite = [v for v in logits if v != -math.inf]
    top = max(finite)
    return -(logits[target] - top - math.log(sum(math.exp(v - top) for v in finite)))


def _hand_contrastive(regions, texts, nouns, scale):
    n = len(nouns)
    sims = [[scale * float(regions[i] @ texts[j]) for j in range(n)] for i in range(n)]
    i2t = t2i = 0.0
    for i in range(n):
        row = [sims[i][j] if (j == i or nouns[j] != nouns[i]) else -math.inf for j in range(n)]
        col = [sims[j][i] if (j == i or nouns[j] != nouns[i]) else -math.inf for j in range(n)]
        i2t += _cross_entropy(row, i)
        t2i += _cross_entropy(col, i)
    return 0.5 * (i2t / n + t2i / n)


def test_contrastive_loss_matches_hand_computation_without_duplicates():
    regions = _unit([[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [0.0, 0.4, 1.0]])
    texts = _unit([[0.9, 0.0, 0.1], [0.2, 0.8, 0.0], [0.3, 0.3, 0.9]])
    nouns = torch.tensor([0, 1, 2])
    got = contrastive_loss(regions, texts, nouns, logit_scale=10.0)
    assert float(got) == pytest.approx(_hand_contrastive(regions, texts, [0, 1, 2], 10.0), rel=1e-5)
    # Without duplicates this is exactly CLIP's symmetric loss.
    logits = 10.0 * regions @ texts.T
    clip = 0.5 * (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3)))
    assert float(got) == pytest.approx(float(clip), rel=1e-5)


def test_duplicate_nouns_are_not_negatives_of_each_other():
    regions = _unit([[1.0, 0.1, 0.0], [0.9, 0.3, 0.1], [0.0, 1.0, 0.2], [0.2, 0.1, 1.0]])
    text_of = {0: [1.0, 0.2, 0.0], 1: [0.1, 1.0, 0.1], 2: [0.0, 0.2, 1.0]}
    nouns = [0, 0, 1, 2]  # regions 0 and 1 share noun 0, so they share one text embedding
    texts = _unit([text_of[n] for n in nouns])
    mask = duplicate_noun_mask(torch.tensor(nouns))
    assert mask.tolist() == [[False, True, False, False], [True, False, False, False],
                             [False, False, False, False], [False, False, False, False]]
    got = float(contrastive_loss(regions, texts, torch.tensor(nouns), logit_scale=5.0))
    assert got == pytest.approx(_hand_contrastive(regions, texts, nouns, 5.0), rel=1e-5)
    # Counting the duplicate as a negative would give a different (larger) loss.
    logits = 5.0 * regions @ texts.T
    naive = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))
    assert float(naive) > got + 0.1


def test_perfectly_aligned_batch_with_duplicates_has_near_zero_loss():
    basis = torch.eye(3, dtype=torch.float64)
    nouns = torch.tensor([0, 0, 1, 2, 2])
    regions = texts = basis[nouns]
    assert float(contrastive_loss(regions, texts, nouns, logit_scale=100.0)) < 1e-10
    # A single noun in the whole batch: no negatives at all, nothing to learn.
    same = torch.zeros(3, dtype=torch.long)
    assert float(contrastive_loss(_unit([[1, 0], [0, 1], [1, 1]]), basis[:, :2][[0, 0, 0]], same)) == 0.0


def test_contrastive_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="must both be"):
        contrastive_loss(torch.zeros(2, 3), torch.zeros(3, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="noun_ids"):
        contrastive_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="at least one"):
        contrastive_loss(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_vocabulary_loss_is_cross_entropy_of_cosine_times_100():
    regions = _unit([[1.0, 0.0], [0.6, 0.8]])
    vocabulary = _unit([[1.0, 0.0], [0.0, 1.0], [0.6, -0.8]])
    nouns = torch.tensor([0, 1])
    cos = [[1.0, 0.0, 0.6], [0.6, 0.8, 0.36 - 0.64]]
    assert torch.allclose(vocabulary_logits(regions, vocabulary), 100 * torch.tensor(cos), atol=1e-4)
    wrong = torch.tensor([2, 0])  # targets that are not the nearest entries: a loss of about 30
    expected = sum(_cross_entropy([100 * c for c in cos[i]], int(wrong[i])) for i in range(2)) / 2
    assert expected == pytest.approx(30.0, abs=0.01)
    assert float(vocabulary_loss(regions, vocabulary, wrong)) == pytest.approx(expected, rel=1e-5)
    assert float(vocabulary_loss(regions, vocabulary, nouns)) < 1e-6
    assert vocabulary_correct(regions, vocabulary, nouns) == 2
    assert vocabulary_correct(regions, vocabulary, torch.tensor([2, 1])) == 1
    assert vocabulary_correct(regions[:0], vocabulary, nouns[:0]) == 0


def test_losses_have_gradients_for_the_regions_only_path():
    regions = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1).requires_grad_()
    texts = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    nouns = torch.tensor([0, 1, 1, 2])
    (contrastive_loss(regions, texts[nouns], nouns) + vocabulary_loss(regions, texts, nouns)).backward()
    assert regions.grad is not None and torch.isfinite(regions.grad).all() and regions.grad.abs().sum() > 0


# --- gathered negatives under DDP: same gradient as one process holding the whole batch ---------

_LOCAL_ROWS = (3, 5)  # ragged: the gather pads and trims


def _ddp_problem():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4, bias=False)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(sum(_LOCAL_ROWS), 6, generator=generator)
    noun_ids = torch.tensor([0, 1, 2, 1, 3, 4, 0, 5])  # duplicates across the two ranks
    vocabulary = F.normalize(torch.randn(6, 4, generator=generator), dim=-1)
    return model, inputs, noun_ids, vocabulary


def _trainer_loss(embeddings, noun_ids, vocabulary, gather_negatives):
    """:meth:`RegionTrainer._loss` itself (the part that gathers and rescales), on a stand-in trainer."""
    from types import SimpleNamespace

    from ovseg_ray.training.clip_steps import RegionTrainer

    trainer = SimpleNamespace(objective="clip", gather_negatives=gather_negatives, vocabulary=vocabulary,
                              logit_scale=100.0)
    return RegionTrainer._loss(trainer, embeddings, noun_ids)


def _ddp_worker(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, inputs, noun_ids, vocabulary = _ddp_problem()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        start = sum(_LOCAL_ROWS[:rank])
        rows = slice(start, start + _LOCAL_ROWS[rank])
        embeddings = F.normalize(ddp(inputs[rows]), dim=-1)
        backward_loss, reported = _trainer_loss(embeddings, noun_ids[rows], vocabulary, True)
        backward_loss.backward()
        results.put((rank, float(reported.detach()), model.weight.grad.tolist()))  # plain lists: no shared memory
    finally:
        dist.destroy_process_group()


def test_gathered_negatives_under_ddp_give_the_single_process_gradient():
    model, inputs, noun_ids, vocabulary = _ddp_problem()
    backward_loss, reported = _trainer_loss(F.normalize(model(inputs), dim=-1), noun_ids, vocabulary, False)
    backward_loss.backward()

    outcome = run_ranks(_ddp_worker, timeout=60)
    for rank, loss, grad in outcome:
        assert loss == pytest.approx(float(reported.detach()), rel=1e-5), rank
        torch.testing.assert_close(torch.tensor(grad), model.weight.grad, rtol=1e-4, atol=1e-6)
    # Without the world-size factor DDP's averaging would halve the gradient: the check can fail.
    assert model.weight.grad.abs().max() > 1e-3
