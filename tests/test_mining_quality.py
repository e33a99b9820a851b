"""Quality signals on every mined pair, the filters on them and the duplicate rule (issue 17, item 4)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from pycocotools import mask as mask_utils

from ovseg_ray.data.pair_store import OutputLayout
from ovseg_ray.mining.quality import PairSignals, duplicates_of, keep
from ovseg_ray.mining.stages import MatchingStage, ProposalStage, prepare_images


def test_duplicates_rule_flags_the_head_noun_of_a_compound_on_the_same_mask():
    nouns = ["dining table", "table", "chair", "table lamp", "lamp"]
    proposals = [3, 3, 3, 5, 6]
    assert duplicates_of(nouns, proposals) == ["", "dining table", "", "", ""]  # "lamp" took another mask


def test_filters_keep_or_drop_each_signal():
    pair = PairSignals(0, 0, 0.3, area_fraction=0.2, score_margin=0.05, objectness=0.6, caption_index=1)
    assert keep(pair, {})
    assert keep(pair, {"min_area_fraction": 0.1, "max_area_fraction": 0.5, "min_score_margin": 0.05,
                       "min_objectness": 0.6, "max_caption_index": 1})
    for failing in ({"min_area_fraction": 0.25}, {"max_area_fraction": 0.1}, {"min_score_margin": 0.06},
                    {"min_objectness": 0.7}, {"max_caption_index": 0}):
        assert not keep(pair, failing), failing
    duplicate = PairSignals(0, 0, 0.3, 0.2, None, 0.6, 0, duplicate_of="dining table")
    assert keep(duplicate, {"duplicates": "flag", "min_score_margin": 0.5})  # no margin with one region
    assert not keep(duplicate, {"duplicates": "drop"})


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_signals_by_hand(synth_dataset, tiny_model, one_thread):
    """area = mask pixels / image pixels, margin = best - second-best cosine, objectness = 1 - the
    MaskFormer's no-object probability over the image's nouns, caption index as extracted."""
    from ovseg_ray.data.images import load_image
    from ovseg_ray.inference import Segmenter, image_to_tensor
    from ovseg_ray.models.ensemble import cosine_logits

    data = json.loads((synth_dataset / "annotations" / "captions.json").read_text())
    image_info = data["images"][0]
    captions = [a["caption"] for a in sorted(data["annotations"], key=lambda a: a["id"])
                if a["image_id"] == image_info["id"]][:2]
    uri = str(synth_dataset / "images" / image_info["file_name"])
    rows = [{"shard": 0, "image_id": image_info["id"], "image_uri": uri, "captions": captions}]
    kwargs = {"preset": "tiny", "weights": "default", "seed": 0, "device": "cpu", "threads": 1}
    prepared = prepare_images(pa.Table.from_pylist(rows), compounds=True, extra_blocklist=[], max_image_pixels=10**8)
    proposed = ProposalStage(**kwargs, threshold=0.4, min_pixels=1)(prepared)
    matched = MatchingStage(**kwargs, min_score=None)(proposed).to_pylist()[0]
    assert matched["pair_noun"], matched["error_reason"]

    segmenter = Segmenter(tiny_model)
    image = load_image(uri)
    nouns = prepared.column("nouns").to_pylist()[0]
    proposals = segmenter.propose(image)
    query_index = proposed.column("proposal_index").to_pylist()[0]
    no_object = tiny_model.non_object_embedding.view(1, -1)
    classifier = torch.nn.functional.normalize(torch.cat([segmenter.text(nouns), no_object]), dim=-1)
    p_no_object = cosine_logits(proposals.class_embeddings, classifier, 100.0).softmax(-1)[:, -1]
    rles = proposed.column("proposal_rle").to_pylist()[0]
    masks = torch.from_numpy(np.stack([mask_utils.decode({"size": [image.shape[0], image.shape[1]],
                                                          "counts": r.encode()}) for r in rles])).bool()
    regions, _ = segmenter.embed_regions(image_to_tensor(image), masks)
    for k, noun in enumerate(matched["pair_noun"]):
        position = rles.index(matched["pair_rle"][k])
        assert matched["pair_area"][k] == pytest.approx(masks[position].sum().item() / image[..., 0].size, rel=1e-6)
        assert matched["pair_objectness"][k] == pytest.approx(1 - p_no_object[query_index[position]].item(), abs=1e-5)
        cosines = sorted((regions @ segmenter.text([noun])[0]).tolist(), reverse=True)
        assert matched["pair_score"][k] == pytest.approx(cosines[0], abs=1e-5)
        assert matched["pair_margin"][k] == pytest.approx(cosines[0] - cosines[1], abs=1e-5)
    noun_captions = prepared.column("noun_captions").to_pylist()[0]
    assert matched["pair_caption"] == [noun_captions[nouns.index(n)] for n in matched["pair_noun"]]

    # Filters in the stage: everything filtered out is an error row naming the filters.
    strict = MatchingStage(**kwargs, min_score=None, filters={"min_objectness": 1.0, "duplicates": "flag"})
    row = strict(proposed).to_pylist()[0]
    assert row["pair_noun"] == [] and row["error_stage"] == "matching"
    assert row["error_reason"].startswith("no pair passes the filters: ") and "min_objectness=1.0" in row["error_reason"]


def test_mined_pairs_carry_the_signals(mined_pairs):
    _, out = mined_pairs
    pairs = OutputLayout(str(out)).read_table("pairs").to_pylist()
    for row in pairs:
        mask = mask_utils.decode({"size": row["rle_size"], "counts": row["rle_counts"].encode()})
        assert row["area_fraction"] == pytest.approx(mask.sum() / mask.size, rel=1e-5)
        assert 0.0 <= row["objectness"] <= 1.0
        assert row["score_margin"] is None or row["score_margin"] >= 0.0
        assert row["caption_index"] == 0  # one caption per image
        assert row["duplicate_of"] == "" or row["noun"] == row["duplicate_of"].split()[-1]
