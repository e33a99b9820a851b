"""The whole two-stage inference against a reference pipeline written from the official definitions
(issue 11): processing resize, per-mask region loop, official ensemble, whole-map score resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import official_reference as ref
from ovseg_ray.inference import Segmenter, processing_size, vocabulary
from ovseg_ray.models.ensemble import UNLABELLED, clip_probs, maskformer_probs
from ovseg_ray.models.official import BENCHMARK_LAMBDAS, DEMO_MASK_THRESHOLD, PRESET_MASK_THRESHOLDS
from ovseg_ray.models.ovseg import load_preset

CLASSES = ["sky", "grass", "boat", "road"]
FAINT = [0, 5, 9]  # queries whose masks stay below the threshold everywhere, with sigmoid mass ~0.4


@pytest.fixture(scope="module")
def model():
    """The tiny preset with proposals made to vary: the random network's 16 masks are near copies of
    each other, so the test widens their logits and flattens three queries below any threshold >= 0.5
    and points their class embeddings away from the others' (wrapping the MaskFormer's output: both
    pipelines below see the same proposals)."""
    from ovseg_ray.models.ovseg import build_model

    built = build_model("tiny", seed=3)
    propose, propose_many = built.maskformer.propose, built.maskformer.propose_many

    def vary(out):
        logits = out["mask_logits"] * 6.0
        logits[FAINT] = logits[FAINT] * 0.02 - 0.4
        embeddings = out["class_embeddings"].clone()
        embeddings[FAINT] = -embeddings.mean(dim=0)  # the faint queries favour other classes
        return {"class_embeddings": torch.nn.functional.normalize(embeddings, dim=-1), "mask_logits": logits}

    # the reference calls propose, the Segmenter the batched propose_many: both see the same proposals
    built.maskformer.propose = lambda image: vary(propose(image))
    built.maskformer.propose_many = lambda images, *args, **kwargs: [
        vary(out) for out in propose_many(images, *args, **kwargs)]
    return built


def _reference_labels(segmenter: Segmenter, image: np.ndarray, classes: list[str], weight: float,
                      threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(official labels, the score map they come from) with the official ``CLIP_ENSEMBLE_WEIGHT``."""
    model, config = segmenter.model, segmenter.config
    height, width = image.shape[:2]
    size = ref.processing_size(height, width, config.min_size, config.max_size)
    resized = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
    tensor = torch.from_numpy(resized.copy()).permute(2, 0, 1).float()
    with torch.no_grad():
        out = model.maskformer.propose(tensor)
        text = segmenter.text(classes)
        p_mf = maskformer_probs(out["class_embeddings"], text, model.non_object_embedding, config.temperature)
        masks = out["mask_logits"].sigmoid()
        regions, region_masks, valid = ref.regions_loop(tensor, masks > threshold, model.region_encoder.image_size)
        embeddings = model.region_encoder(regions, region_masks) if len(regions) else torch.zeros(0, text.shape[1])
        p_clip = clip_probs(embeddings, text, config.temperature)
        probs, keep = ref.official_ensemble(p_mf, p_clip, valid, weight)
        scores = ref.fused_scores(probs, masks[keep], (height, width))
    return scores.argmax(0), scores


def _agree(labels: np.ndarray, reference: torch.Tensor, scores: torch.Tensor) -> None:
    """Equal wherever the reference's best class leads the next by more than float noise (relative)."""
    top = scores.topk(2, dim=0).values
    decided = ((top[0] - top[1]) > 1e-4 * top[0]).numpy()
    assert decided.mean() > 0.98
    assert np.array_equal(labels[decided], reference.numpy()[decided])


@pytest.mark.parametrize("shape", [(101, 147), (200, 90), (128, 171)])
@pytest.mark.parametrize("lam", [0.3, 0.7, 1.0])
def test_segment_equals_the_official_pipeline(model, shape, lam):
    """Odd sizes (output != processing size, both ways), proposals that lose their region at the
    threshold but keep sigmoid mass, and lambda 1 = the official CLIP-only inference (weight 0)."""
    segmenter = Segmenter(model)
    image = np.random.default_rng(sum(shape)).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    threshold = 0.5
    result = segmenter.segment(image, CLASSES, lam=lam, mask_threshold=threshold)
    faint = segmenter.propose(image).mask_logits[FAINT].sigmoid()
    assert faint.max() < threshold and faint.mean() > 0.3  # no region, but sigmoid mass in the fusion
    weight = 0.0 if lam == 1.0 else lam  # the official code's weight 0 means CLIP only
    reference, scores = _reference_labels(segmenter, image, CLASSES, weight, threshold)
    assert result.labels.shape == shape
    assert 0 < result.num_valid_regions < result.num_proposals  # some proposals have no region
    _agree(result.labels, reference, scores)


def test_a_proposal_without_region_fuses_p_mf_to_the_power_one_minus_lambda(model):
    """Query 1 has no region at threshold 0.5 but sigmoid 0.49 everywhere; query 0 fades from left to
    right. Official: query 1 enters with p_mf ** 0.3 and wins three columns for class 1; our old rule
    (p_mf kept) gave it one."""
    segmenter = Segmenter(model)
    p_mf = torch.tensor([[0.05, 0.01], [0.02, 0.08]])
    p_clip = torch.tensor([[0.9, 0.1]])  # query 0's region
    valid = torch.tensor([True, False])
    fade = torch.logit(torch.linspace(0.9, 0.05, 12)).view(1, 1, 12).expand(1, 4, 12)
    logits = torch.cat([fade, torch.full((1, 4, 12), float(torch.logit(torch.tensor(0.49))))])
    labels = segmenter.fuse(p_mf, p_clip, valid, logits, (4, 12), lam=0.7)
    probs, keep = ref.official_ensemble(p_mf, p_clip, valid, 0.7)
    assert np.array_equal(labels, ref.fused_scores(probs, logits[keep].sigmoid(), (4, 12)).argmax(0).numpy())
    old = p_mf.clone()
    old[0] = p_mf[0] ** 0.3 * p_clip[0] ** 0.7
    old_labels = ref.fused_scores(old, logits.sigmoid(), (4, 12)).argmax(0).numpy()
    # by hand: class 1 wins where query 0's sigmoid s < 0.24 (official) or s < 0.09 (old rule)
    assert labels[0].tolist() == [0] * 9 + [1] * 3 and old_labels[0].tolist() == [0] * 11 + [1]


def test_processing_size_rounds_like_detectron2():
    assert processing_size(1024, 1537, 512, 2048) == (512, 769)  # round() would give 768
    for height, width in [(480, 640), (100, 4000), (1537, 1024), (333, 333), (7, 3001), (2999, 2000)]:
        assert processing_size(height, width, 512, 2048) == ref.processing_size(height, width, 512, 2048)
        assert processing_size(height, width, 640, 2560) == ref.processing_size(height, width, 640, 2560)


def test_official_settings_in_one_place():
    assert load_preset("r101c-vitb16").mask_threshold == PRESET_MASK_THRESHOLDS["r101c-vitb16"] == 0.5
    assert load_preset("swinb-vitl14").mask_threshold == PRESET_MASK_THRESHOLDS["swinb-vitl14"] == 0.4
    assert BENCHMARK_LAMBDAS == {"ade20k_150": 0.7, "ade20k_847": 0.7, "pascal_context_59": 0.6,
                                 "pascal_context_459": 0.6, "pascal_voc_20": 0.45}


def test_demo_mode_is_the_official_demo(model):
    segmenter = Segmenter(model)
    image = np.random.default_rng(2).integers(0, 256, size=(90, 140, 3), dtype=np.uint8)
    result = segmenter.segment(image, ["boat"], mode="demo")
    assert result.classes == ["boat", "others"]  # one name: "others" appended, as the official demo
    proposals = segmenter.propose(image)
    binary = proposals.binary_masks(DEMO_MASK_THRESHOLD)
    embeddings, valid = segmenter.embed_regions(proposals.image, binary)
    p_clip = segmenter.clip_probs(embeddings, ["boat", "others"])
    expected = ref.demo_labels(p_clip, valid, proposals.mask_logits, (90, 140), DEMO_MASK_THRESHOLD,
                               ["boat", "others"])
    assert np.array_equal(result.labels, expected.numpy())
    assert set(np.unique(result.labels)) <= {UNLABELLED, 0, 1}
    fractions = result.pixel_fractions()
    assert abs(sum(fractions.values()) + result.unlabelled_fraction() - 1.0) < 1e-9
    with pytest.raises(ValueError, match="CLIP only"):
        segmenter.segment(image, ["boat"], mode="demo", lam=0.5)
    with pytest.raises(ValueError, match="mode"):
        segmenter.segment(image, ["boat"], mode="fast")
    assert vocabulary(["a", "b"], "demo") == ["a", "b"] and vocabulary(["a"], "eval") == ["a"]


def test_processing_resize_is_pil_bilinear_on_uint8(model):
    segmenter = Segmenter(model)
    image = np.random.default_rng(4).integers(0, 256, size=(77, 301, 3), dtype=np.uint8)
    size = processing_size(77, 301, segmenter.config.min_size, segmenter.config.max_size)
    expected = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
    got = segmenter.resize_for_model(image)
    assert torch.equal(got, torch.from_numpy(expected.copy()).permute(2, 0, 1).float())
