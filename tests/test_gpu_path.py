"""The GPU path on the CPU (issue 18): precision, batched MaskFormer over images of several sizes, skip options.

bf16 runs through CPU autocast here, so its agreement with fp32 is checked without a GPU.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from ovseg_ray.config import ConfigError, ModelConfig, load_config
from ovseg_ray.device import autocast_dtype
from ovseg_ray.inference import Segmenter
from ovseg_ray.models.ensemble import kept_proposals

CLASSES = ["sky", "wall", "grass", "water", "sand", "road", "floor", "ball", "car", "boat", "tree", "person"]

#: bf16 against fp32 on the tiny preset: share of pixels with the same label, at least (measured: 1.0).
BF16_MIN_AGREEMENT = 0.99
#: ... and mask logits at most this far apart (measured: about 0.05 on logits of magnitude ~10).
BF16_MAX_LOGIT_DIFF = 0.5


def scene(height: int, width: int, seed: int) -> np.ndarray:
    """Three coloured regions plus noise: a small image with structure the tiny model sees."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2] = (200, 30, 30)
    image[height // 2:] = (20, 160, 40)
    image[height // 4: height // 2, width // 3: 2 * width // 3] = (20, 20, 220)
    return (image + rng.integers(0, 40, image.shape)).astype(np.uint8)


# Processing sizes (tiny: shorter side 128): 128x171, 128x171 (one padded size, 128x192), 171x128, 128x128.
IMAGES = [scene(96, 128, 0), scene(120, 160, 1), scene(160, 120, 2), scene(100, 100, 3)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine, these small forwards run several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fp32(tiny_model):
    return Segmenter(tiny_model, precision="fp32")


@pytest.fixture(scope="module")
def singles(fp32):
    """Each image's proposals from its own forward."""
    return [fp32.propose(image) for image in IMAGES]


def test_precision_resolution_and_config():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16 and autocast_dtype("fp16", cpu) is torch.float16
    with pytest.raises(ValueError, match="needs a CUDA device"):
        autocast_dtype("bf16", cpu, allow_cpu=False)  # the training steps' rule
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_dtype("half", cpu)
    with pytest.raises(ConfigError, match="precision"):
        load_config(ModelConfig, overrides={"precision": "half"})
    config = load_config(ModelConfig, overrides={"precision": "bf16", "max_regions_per_forward": 7,
                                                 "skip_min_area": 5, "skip_no_object_above": 0.9})
    assert config.segmenter_options() == {"precision": "bf16", "max_regions_per_forward": 7,
                                          "skip_min_area": 5, "skip_no_object_above": 0.9}
    segmenter = Segmenter.from_config(config, device="cpu")
    assert (segmenter.precision, segmenter.max_regions_per_forward, segmenter.autocast_dtype) == \
        ("bf16", 7, torch.bfloat16)
    assert Segmenter.from_config(ModelConfig(), device="cpu").autocast_dtype is None  # auto on CPU = fp32


def test_bf16_agrees_with_fp32_on_tiny(tiny_model, fp32, singles):
    bf16 = Segmenter(tiny_model, precision="bf16")
    agreement, logit_diffs = [], []
    for image, a in zip(IMAGES[:2], singles):
        b = bf16.propose(image)
        assert b.mask_logits.dtype == torch.float32 and b.class_embeddings.dtype == torch.float32
        logit_diffs.append(float((a.mask_logits - b.mask_logits).abs().max()))
        agreement.append(float((fp32.segment(image, CLASSES).labels == bf16.segment(image, CLASSES).labels).mean()))
    assert min(logit_diffs) > 0.0  # the networks did run in bf16
    assert max(logit_diffs) <= BF16_MAX_LOGIT_DIFF, logit_diffs
    assert float(np.mean(agreement)) >= BF16_MIN_AGREEMENT, agreement
    embeddings, _ = bf16.embed_regions(a.image, a.binary_masks(0.4))
    assert embeddings.dtype == torch.float32


@contextmanager
def count_calls(module: torch.nn.Module):
    """Counts ``module``'s forward calls inside the block (the hook is removed after it)."""
    calls = [0]
    handle = module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def test_batched_maskformer_over_sizes_equals_per_image(tiny_model, fp32, singles):
    with count_calls(tiny_model.maskformer) as calls:
        batched = fp32.propose_many(IMAGES)
    assert calls[0] == 3  # the two images of one padded size share a forward
    for one, many in zip(singles, batched):
        assert many.mask_logits.shape == one.mask_logits.shape
        torch.testing.assert_close(many.mask_logits, one.mask_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(many.class_embeddings, one.class_embeddings, atol=1e-5, rtol=1e-5)
    # detectron2's padding of mixed sizes to one canvas moves the outputs: why only equal sizes share one
    mixed = tiny_model.maskformer.propose_many([p.image for p in singles], mixed_padding=True)
    assert max(float((m["mask_logits"] - p.mask_logits).abs().max()) for m, p in zip(mixed, singles)) > 1e-2

    results = fp32.segment_many(IMAGES, CLASSES)
    for image, result in zip(IMAGES, results):
        alone = fp32.segment(image, CLASSES)
        assert np.array_equal(result.labels, alone.labels)
        assert result.num_valid_regions == alone.num_valid_regions
    settings = [(0.7, 0.4), (1.0, 0.3)]
    for image, swept in zip(IMAGES[:2], fp32.segment_settings_many(IMAGES[:2], CLASSES, settings)):
        for labels, alone in zip(swept, fp32.segment_settings(image, CLASSES, settings)):
            assert np.array_equal(labels, alone)


def test_max_regions_per_forward_chunks_the_clip_stage(tiny_model, fp32, singles):
    items = [(p.image, p.binary_masks(0.4)) for p in singles[:2]]
    small = Segmenter(tiny_model, precision="fp32", max_regions_per_forward=5)
    with count_calls(tiny_model.region_encoder) as calls:
        whole = fp32.embed_regions_many(items)
        regions = sum(len(e) for e, _ in whole)
        chunked = small.embed_regions_many(items)
    assert calls[0] == 1 + -(-regions // 5)
    for (a, valid_a), (b, valid_b) in zip(whole, chunked):
        assert torch.equal(valid_a, valid_b)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_kept_proposals_by_hand():
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # 4 pixels
    masks[1, :, :3] = True  # 12 pixels
    p_mf = torch.tensor([[0.5, 0.4], [0.05, 0.05], [0.3, 0.3]])  # no-object: 0.1, 0.9, 0.4
    assert kept_proposals(masks, p_mf) is None  # options off: nothing is even computed
    assert kept_proposals(masks, p_mf, min_area=5).tolist() == [False, True, False]
    assert kept_proposals(masks, p_mf, no_object_above=0.5).tolist() == [True, False, True]
    assert kept_proposals(masks, p_mf, min_area=4, no_object_above=0.5).tolist() == [True, False, False]


def test_skip_options_off_or_unable_to_matter_change_nothing(tiny_model, fp32):
    image, threshold = IMAGES[0], 0.6
    explicit = Segmenter(tiny_model, precision="fp32", skip_min_area=0, skip_no_object_above=None)
    # min area 1 skips exactly the empty masks, which get no region anyway; no-object 1.0 skips nothing
    harmless = Segmenter(tiny_model, precision="fp32", skip_min_area=1, skip_no_object_above=1.0)
    reference = fp32.segment(image, CLASSES, mask_threshold=threshold)
    for other in (explicit, harmless):
        result = other.segment(image, CLASSES, mask_threshold=threshold)
        assert np.array_equal(result.labels, reference.labels)
        assert result.num_valid_regions == reference.num_valid_regions


@torch.no_grad()
def test_skipped_proposals_get_no_region(tiny_model, fp32, singles):
    image, props, threshold, lam = IMAGES[1], singles[1], 0.4, 0.7
    masks = props.binary_masks(threshold)
    areas = masks.flatten(1).sum(1)
    min_area = int(areas.median())
    keep = areas >= min_area
    assert 0 < int(keep.sum()) < len(keep)
    # reference from the stages with no skipping: every region's CLIP probabilities, the skipped rows dropped
    p_mf = fp32.maskformer_probs(props.class_embeddings, CLASSES)
    p_clip, valid = fp32.classify_regions(props.image, masks, CLASSES)
    rows = keep[valid.nonzero().flatten()]
    expected = fp32.fuse(p_mf, p_clip[rows], valid & keep, props.mask_logits, image.shape[:2], lam)
    skipping = Segmenter(tiny_model, precision="fp32", skip_min_area=min_area)
    result = skipping.segment(image, CLASSES, lam=lam, mask_threshold=threshold)
    assert result.num_valid_regions == int((valid & keep).sum())
    assert np.array_equal(result.labels, expected)

    # random weights (the tiny preset without its shipped ones) give every query a no-object probability
    # near 1: all are skipped, the CLIP encoder never runs, and the fusion is that of no region at all
    from ovseg_ray.models.ovseg import build_model

    random_model = build_model("tiny", weights="none")
    plain = Segmenter(random_model, precision="fp32")
    props = plain.propose(image)
    p_mf = plain.maskformer_probs(props.class_embeddings, CLASSES)
    assert float((1.0 - p_mf.sum(1)).min()) > 0.5
    with count_calls(random_model.region_encoder) as calls:
        none_left = Segmenter(random_model, precision="fp32", skip_no_object_above=0.5).segment(image, CLASSES,
                                                                                              lam=lam)
    assert calls[0] == 0 and none_left.num_valid_regions == 0
    no_region = torch.zeros(len(p_mf), dtype=torch.bool)
    assert np.array_equal(none_left.labels, plain.fuse(p_mf, p_clip[:0], no_region, props.mask_logits,
                                                       image.shape[:2], lam))
    assert not np.array_equal(none_left.labels, plain.segment(image, CLASSES, lam=lam).labels)


class RefusingSegmenter(Segmenter):
    """The real segmenter, except that it cannot take images 77 pixels wide (an input it fails on)."""

    batches: list[int] = []

    def segment_many(self, images, *args, **kwargs):
        self.batches.append(len(images))
        if any(image.shape[1] == 77 for image in images):
            raise ValueError("cannot take an image 77 pixels wide")
        return super().segment_many(images, *args, **kwargs)


def test_segment_batch_task_batches_and_isolates_a_bad_image(tiny_model, tmp_path):
    import io
    import json

    from PIL import Image

    from ovseg_ray.evaluation.batch_segment import SegmentTask

    def png(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    good, bad = IMAGES[0], scene(60, 77, 5)
    rows = [{"image_uri": f"in/{name}.png", "stem": name, "image_uri_bytes": data, "image_uri_error": error}
            for name, data, error in [("a", png(good), ""), ("b", png(bad), ""), ("c", b"not an image", ""),
                                      ("d", None, "file not found"), ("e", png(IMAGES[1]), "")]]
    segmenter = RefusingSegmenter(tiny_model, precision="fp32")
    task = SegmentTask(str(tmp_path), CLASSES, lam=None, mask_threshold=None)
    segmenter.batches = []
    out = task.process_batch(segmenter, rows)
    assert segmenter.batches == [3, 1, 1, 1]  # the batch of readable images, then each alone after the failure
    assert [(r["stem"], r["status"]) for r in out] == [("a", "segmented"), ("b", "error"), ("c", "error"),
                                                       ("d", "error"), ("e", "segmented")]
    assert "77 pixels wide" in out[1]["reason"] and out[3]["reason"] == "file not found"
    for stem, image in (("a", good), ("e", IMAGES[1])):
        written = json.loads((tmp_path / f"{stem}.json").read_text())
        expected = Segmenter(tiny_model, precision="fp32").segment(image, CLASSES)
        assert written["classes"] == expected.classes and written["height"] == image.shape[0]
        assert written["pixel_fractions"] == expected.pixel_fractions()
    assert not (tmp_path / "b.json").exists()


class RefusingSweepSegmenter(Segmenter):
    """A segmenter whose batched sweep, like the one above, refuses images 77 pixels wide."""

    def segment_settings_many(self, images, *args, **kwargs):
        self.batches.append(len(images))
        if any(image.shape[1] == 77 for image in images):
            raise ValueError("cannot take an image 77 pixels wide")
        return super().segment_settings_many(images, *args, **kwargs)


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_eval_task_batches_and_isolates_a_bad_image(tiny_model):
    """eval predicts an actor batch's images together; a batch that fails is redone image by image,
    and each image's confusion cells equal its own unbatched prediction's."""
    from ovseg_ray.data.readers import custom_layout
    from ovseg_ray.evaluation import metrics
    from ovseg_ray.evaluation.benchmark import EvalTask

    layout = custom_layout("toy", len(CLASSES), "images", "labels")
    rng = np.random.default_rng(4)
    images = [IMAGES[0], scene(60, 77, 5), IMAGES[1]]
    labels = [rng.integers(0, len(CLASSES), image.shape[:2]).astype(np.uint8) for image in images]
    rows = [{"image_uri": f"in/{n}.png", "label_uri": f"gt/{n}.png", "image_uri_bytes": _png(image),
             "image_uri_error": "", "label_uri_bytes": _png(label), "label_uri_error": ""}
            for n, (image, label) in enumerate(zip(images, labels))]
    rows.append({**rows[0], "image_uri": "in/broken.png", "image_uri_bytes": b"not an image"})
    settings = [(0.7, 0.4), (0.0, 0.4)]
    task = EvalTask(layout, CLASSES, settings)
    segmenter = RefusingSweepSegmenter(tiny_model, precision="fp32")
    segmenter.batches = []
    out = task.process_batch(segmenter, rows)
    assert segmenter.batches == [3, 1, 1, 1]  # the readable images together, then each alone
    by_image = {}
    for row in out:
        by_image.setdefault(row["image_uri"], []).append(row)
    assert [r["stage"] for r in by_image["in/1.png"]] == ["model"] and "77 pixels" in by_image["in/1.png"][0]["reason"]
    assert [r["stage"] for r in by_image["in/broken.png"]] == ["image"]
    for n in (0, 2):
        expected = Segmenter(tiny_model, precision="fp32").segment_settings(images[n], CLASSES, settings)
        got = by_image[f"in/{n}.png"]
        assert [r["setting"] for r in got] == [0, 1]
        for row, pred in zip(got, expected):
            cells, counts = metrics.confusion_cells(pred, labels[n].astype(np.int32), len(CLASSES))
            assert row["cells"] == cells.tolist() and row["counts"] == counts.tolist()
    # Batched when nothing fails: one sweep call for the two good images.
    segmenter.batches = []
    assert task.process_batch(segmenter, [rows[0], rows[2]]) == by_image["in/0.png"] + by_image["in/2.png"]
    assert segmenter.batches == [2]


def test_mining_proposals_of_a_batch_equal_each_image_alone(tiny_model):
    """mining's proposal stage runs its batch's images through one MaskFormer forward per padded size:
    the kept masks and objectness equal each image's own run."""
    from ovseg_ray.mining.matching import ProposalMasks

    stage = ProposalMasks(Segmenter(tiny_model, precision="fp32"), min_pixels=4)
    nouns = [["ball", "car"], None, ["sky"], ["boat", "tree", "grass"]]
    with count_calls(tiny_model.maskformer) as calls:
        batched = stage.many(IMAGES, nouns)
    assert calls[0] == 3
    for image, words, many in zip(IMAGES, nouns, batched):
        alone = stage(image, words)
        assert many.indices == alone.indices and torch.equal(many.masks, alone.masks)
        np.testing.assert_allclose(many.objectness, alone.objectness, atol=1e-5)
        assert len(many.objectness) == (len(many.indices) if words else 0)
