"""Pair mining: per-image math, the Ray Data pipeline end to end (local and S3), resume, bad input, preview."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from ovseg_ray.data import storage
from ovseg_ray.config import ConfigError
from ovseg_ray.mining.matching import masks_at_size, match_nouns
from ovseg_ray.data.pair_store import OutputLayout
from ovseg_ray.mining.pipeline import InjectedFailure, mine_pairs, plan_pools
from ovseg_ray.mining.stages import MatchingStage, ProposalStage, prepare_images
from ovseg_ray.mining.nouns import get_extractor

from conftest import mining_test_config
from same_rows import assert_same_rows

REPO = Path(__file__).resolve().parent.parent


make_config = mining_test_config


def read_dir(path) -> pa.Table:
    """Every Parquet file under ``path``, read by pyarrow itself (not by our reader)."""
    return pq.read_table(str(path))


def sorted_rows(table: pa.Table, drop: tuple[str, ...] = (), key: tuple[str, ...] = ("image_id", "noun")) -> list[dict]:
    rows = table.drop_columns(list(drop)).to_pylist()
    return sorted(rows, key=lambda r: tuple(r[k] for k in key))


@pytest.fixture(scope="module")
def local_run(mined_pairs):
    return mined_pairs


@pytest.fixture(scope="module")
def coco(synth_dataset):
    data = json.loads((synth_dataset / "annotations" / "captions.json").read_text())
    images = {image["id"]: image for image in data["images"]}
    captions: dict[int, list[str]] = {}
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    return images, captions


# ---------------------------------------------------------------------------------------------
# Plain PyTorch pieces, checked by hand


def test_masks_at_size_resizes_logits_then_thresholds():
    logits = torch.tensor([[[-1.0, 1.0]], [[-5.0, -5.0]], [[5.0, 5.0]]])  # (3, 1, 2)
    # Bilinear, align_corners=False, 2 -> 4 columns: sources clamp to [0, .25, .75, 1] -> [-1, -.5, .5, 1].
    indices, masks = masks_at_size(logits, (1, 4), threshold=0.6)  # logit(0.6) = 0.405
    assert indices == [0, 2]  # mask 1 is empty and dropped
    assert masks.tolist() == [[[False, False, True, True]], [[True, True, True, True]]]
    indices, masks = masks_at_size(logits, (1, 4), threshold=0.65)  # logit(0.65) = 0.619
    assert masks[0].tolist() == [[False, False, False, True]]
    indices, _ = masks_at_size(logits, (1, 4), threshold=0.6, min_pixels=3)
    assert indices == [2]


def test_match_nouns_picks_highest_cosine_first_on_ties():
    regions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.0, 1.0]])
    nouns = torch.tensor([[0.0, 1.0], [0.8, 0.6], [1.0, 0.0]])
    best, scores = match_nouns(nouns, regions)
    assert best.tolist() == [1, 2, 0]  # noun 0 ties regions 1 and 3: the lower index wins
    assert scores.tolist() == pytest.approx([1.0, 0.96, 1.0])


# ---------------------------------------------------------------------------------------------
# Stage classes in-process (no Ray)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _prepared_batch(synth_dataset, coco, image_ids):
    images, captions = coco
    rows = [{"shard": 0, "image_id": i, "image_uri": str(synth_dataset / "images" / images[i]["file_name"]),
             "captions": captions[i][:1]} for i in image_ids]
    return prepare_images(pa.Table.from_pylist(rows), compounds=True, extra_blocklist=[], max_image_pixels=10**8)


def test_no_valid_proposal_and_min_score_become_error_rows(synth_dataset, coco, restore_threads):
    batch = _prepared_batch(synth_dataset, coco, [1, 2])
    assert batch.column("error_stage").to_pylist() == ["", ""]
    kwargs = {"preset": "tiny", "weights": None, "seed": 0, "device": "cpu", "threads": 1}
    empty = ProposalStage(**kwargs, threshold=0.999999, min_pixels=1)(batch)
    assert empty.column("error_stage").to_pylist() == ["proposals", "proposals"]
    assert all(r.startswith("no valid proposal: ") for r in empty.column("error_reason").to_pylist())
    proposed = ProposalStage(**kwargs, threshold=0.4, min_pixels=1)(batch)
    matched = MatchingStage(**kwargs, min_score=0.9999)(proposed)
    assert matched.column("error_stage").to_pylist() == ["matching", "matching"]
    assert all(r.startswith("no pair above min score: ") for r in matched.column("error_reason").to_pylist())
    assert matched.column("pair_noun").to_pylist() == [[], []]
    # The image bytes never leave stage 2 (they would travel to the driver otherwise).
    assert "image" not in matched.column_names


def test_prepare_images_keeps_captions_aligned_and_refuses_huge_images_from_the_header(synth_dataset, coco, tmp_path):
    from ovseg_ray.data.coco import CocoCaptions

    images, _ = coco
    # A blank first caption is skipped when the captions file is read, so the noun's caption is right.
    data = json.loads((synth_dataset / "annotations" / "captions.json").read_text())
    data["annotations"].insert(0, {"id": 0, "image_id": 1, "caption": "   "})
    captions_file = tmp_path / "captions.json"
    captions_file.write_text(json.dumps(data))
    first = CocoCaptions(str(synth_dataset / "images"), str(captions_file), captions_per_image=1).images[0]
    assert first.captions == (coco[1][1][0],)
    rows = [{"shard": 0, "image_id": 1, "image_uri": str(synth_dataset / "images" / images[1]["file_name"]),
             "captions": ["", "A dog on a couch."]}]
    batch = prepare_images(pa.Table.from_pylist(rows), compounds=True, extra_blocklist=[], max_image_pixels=10**8)
    assert batch.column("captions").to_pylist() == [["A dog on a couch."]]
    assert batch.column("noun_captions").to_pylist() == [[0, 0]]
    small = prepare_images(pa.Table.from_pylist(rows), compounds=True, extra_blocklist=[], max_image_pixels=1000)
    assert small.column("error_stage").to_pylist() == ["load"]
    assert small.column("error_reason").to_pylist()[0].startswith("image too large: ")
    assert "limit is 1000" in small.column("error_reason").to_pylist()[0]


# ---------------------------------------------------------------------------------------------
# Acceptance 2 + 6: end to end with a local Ray, two actor pools


def test_end_to_end_pairs_are_valid(local_run, coco, synth_dataset):
    result, out = local_run
    images, captions = coco
    pairs = read_dir(out / "pairs")
    assert pairs.schema.equals(pq.read_schema(next((out / "pairs").glob("*.parquet"))))
    assert pairs.num_rows > 0
    for row in pairs.to_pylist():
        info = images[row["image_id"]]
        rle = {"size": row["rle_size"], "counts": row["rle_counts"].encode("ascii")}
        mask = mask_utils.decode(rle)
        assert mask.shape == (info["height"], info["width"])
        with Image.open(synth_dataset / "images" / info["file_name"]) as img:
            assert (img.height, img.width) == mask.shape
        assert mask.sum() > 0
        assert row["bbox"] == pytest.approx(mask_utils.toBbox(rle).tolist())
        # The noun comes from the image's caption (the first one: captions_per_image = 1).
        assert row["caption"] == captions[row["image_id"]][0]
        assert row["noun"] in get_extractor().nouns(row["caption"])
        for word in row["noun"].split():
            assert re.search(rf"\b{re.escape(word)}", row["caption"].lower()), (word, row["caption"])
        assert -1.0 <= row["score"] <= 1.0
        assert row["image_uri"] == str(synth_dataset / "images" / info["file_name"])
        assert (row["proposal_model"], row["clip_model"], row["proposal_weights"]) == ("tiny", "tiny", "default")
    keys = [(r["image_id"], r["noun"]) for r in pairs.to_pylist()]
    assert len(keys) == len(set(keys))

    errors = read_dir(out / "errors")
    summary = json.loads((out / "summary.json").read_text())
    assert summary == result.summary
    assert summary["images_in"] == len(images) == 12
    assert summary["pairs"] == pairs.num_rows
    assert summary["images_with_pairs"] == len(set(pairs.column("image_id").to_pylist()))
    assert summary["unique_nouns"] == len(set(pairs.column("noun").to_pylist()))
    assert summary["errors"] == errors.num_rows
    assert sum(summary["errors_by_reason"].values()) == errors.num_rows
    # Every image ends with pairs or with an error.
    assert summary["images_with_pairs"] + len(set(errors.column("image_id").to_pylist())) == 12
    assert summary["shards"] == summary["shards_done"] == 3 and summary["complete"]
    assert summary["this_run"]["images_processed"] == 12 and summary["this_run"]["images_per_s"] > 0
    assert "mined %d pairs" % pairs.num_rows in result.summary_line()


def test_pairs_equal_a_sequential_reference(local_run, coco, synth_dataset, tiny_model, restore_threads):
    """The pipeline's pairs for an image equal the plain-PyTorch stages run here, and each score is
    the cosine of the noun's text embedding and the written mask's region embedding."""
    from ovseg_ray.data.images import load_image
    from ovseg_ray.inference import Segmenter, image_to_tensor
    from ovseg_ray.mining.matching import NounMatcher, ProposalMasks
    from ovseg_ray.data.pairs import encode_mask

    torch.set_num_threads(1)  # as in the actors, so that float results match bit for bit
    _, out = local_run
    images, captions = coco
    pairs = read_dir(out / "pairs").to_pylist()
    segmenter = Segmenter(tiny_model)
    for image_id in sorted({r["image_id"] for r in pairs})[:2]:
        image = load_image(str(synth_dataset / "images" / images[image_id]["file_name"]))
        proposals = ProposalMasks(segmenter)(image)
        nouns = [n.noun for n in get_extractor().image_nouns(captions[image_id][:1])]
        matches = NounMatcher(segmenter)(image, proposals.masks, nouns)
        expected = [(nouns[m.noun_index], proposals.indices[m.proposal],
                     encode_mask(proposals.masks[m.proposal].numpy())[0]) for m in matches]
        got = [r for r in pairs if r["image_id"] == image_id]
        assert [(r["noun"], r["proposal_index"], r["rle_counts"]) for r in got] == expected
        assert [r["score"] for r in got] == pytest.approx([m.score for m in matches], abs=1e-5)
        for row in got:
            mask = torch.from_numpy(mask_utils.decode({"size": row["rle_size"], "counts": row["rle_counts"].encode()}))
            region, _ = segmenter.embed_regions(image_to_tensor(image), mask[None].bool())
            cosine = float(region[0] @ segmenter.text([row["noun"]])[0])
            assert cosine == pytest.approx(row["score"], abs=1e-5)


def test_two_actor_pools_visible_in_ray_data_stats(local_run):
    result, out = local_run
    stats = result.stats
    assert (out / "ray_data_stats.txt").read_text() == stats
    assert "actor pool ProposalStage: 2-2 actors, 0.25 CPU + 0 GPU each, batches of 2 images" in stats
    assert "actor pool MatchingStage: 1-1 actors, 0.5 CPU + 0 GPU each, batches of 3 images" in stats
    # Two separate (unfused) actor-pool operators in Ray Data's own stats, each with its tasks and
    # actor metrics.
    operators = re.findall(r"^Operator \d+ (\S+?): (\d+) tasks executed", stats, flags=re.M)
    names = [name for name, _ in operators]
    assert names == ["FromItems", "MapBatches(prepare_images)", "MapBatches(ProposalStage)",
                     "MapBatches(MatchingStage)", "MapBatches(write_parts)"]
    assert stats.count("'num_alive_actors'") >= 2
    # The actors Ray started for the run: 2 in the proposal pool, 1 in the matching pool.
    assert result.new_actors.count("MapWorker(MapBatches(ProposalStage))") == 2
    assert result.new_actors.count("MapWorker(MapBatches(MatchingStage))") == 1


def test_pools_that_cannot_start_are_refused(ray_session, synth_dataset, tmp_path):
    config = make_config(synth_dataset, str(tmp_path), proposals={"num_cpus": 1.0, "min_actors": 1},
                         matching={"num_cpus": 1.0}, load_num_cpus=0.5)
    with pytest.raises(ConfigError, match=r"need 2.5 CPUs \(the cluster has 2\) to start"):
        plan_pools(config)
    with pytest.raises(ValueError, match="no GPUs"):
        plan_pools(make_config(synth_dataset, str(tmp_path), proposals={"num_gpus": 1}))


# ---------------------------------------------------------------------------------------------
# Acceptance 3: S3 in and out


def test_s3_input_and_output_give_the_same_pairs(local_run, synth_dataset, s3_bucket):
    _, out = local_run
    for path in sorted((synth_dataset / "images").glob("*.jpg")):
        storage.write_bytes(f"{s3_bucket}/coco/images/{path.name}", path.read_bytes())
    storage.write_bytes(f"{s3_bucket}/coco/captions.json",
                        (synth_dataset / "annotations" / "captions.json").read_bytes())
    output = f"{s3_bucket}/mined"
    result = mine_pairs(make_config(synth_dataset, output, images=f"{s3_bucket}/coco/images",
                                    captions=f"{s3_bucket}/coco/captions.json"))
    remote = OutputLayout(output).read_table("pairs")
    assert all(uri.startswith(f"{s3_bucket}/coco/images/") for uri in remote.column("image_uri").to_pylist())
    assert_same_rows(sorted_rows(remote, ("image_uri",)), sorted_rows(read_dir(out / "pairs"), ("image_uri",)))
    summary = json.loads(storage.read_bytes(f"{output}/summary.json"))
    assert summary == result.summary and summary["pairs"] == remote.num_rows
    assert storage.exists(f"{output}/errors/shard-00002.parquet")


# ---------------------------------------------------------------------------------------------
# Acceptance 4: crash part-way, re-run, exactly the pairs of the uninterrupted run


def test_resume_after_injected_failure(local_run, synth_dataset, tmp_path):
    _, reference = local_run
    out = tmp_path / "mined"
    # Other batch sizes and pool sizes than the reference run: results must not depend on them.
    settings = {"proposals": {"batch_size": 1, "min_actors": 1, "max_actors": 1, "num_cpus": 0.5},
                "matching": {"batch_size": 1}}
    with pytest.raises(InjectedFailure):
        mine_pairs(make_config(synth_dataset, str(out), fail_after_shards=1, **settings))
    layout = OutputLayout(str(out))
    done = layout.completed_shards()
    assert len(done) == 1
    assert not (out / "summary.json").exists()
    # A crash between a shard's pairs file and its marker leaves an orphan file behind: fake one.
    (orphan,) = [i for i in (0, 1, 2) if i not in done][:1]
    (done_index,) = done
    (out / "pairs" / f"shard-{orphan:05d}.parquet").write_bytes(
        (out / "pairs" / f"shard-{done_index:05d}.parquet").read_bytes())

    result = mine_pairs(make_config(synth_dataset, str(out), **settings))
    assert result.summary["shards_skipped"] == 1
    assert sorted(result.shards_written) == sorted({0, 1, 2} - done)
    assert result.summary["this_run"]["images_processed"] == 12 - 4
    resumed, uninterrupted = read_dir(out / "pairs"), read_dir(reference / "pairs")
    assert resumed.num_rows == uninterrupted.num_rows
    assert_same_rows(sorted_rows(resumed), sorted_rows(uninterrupted))
    error_key = ("image_id", "stage")
    assert sorted_rows(read_dir(out / "errors"), key=error_key) == \
        sorted_rows(read_dir(reference / "errors"), key=error_key)
    for key in ("pairs", "images_with_pairs", "unique_nouns", "errors", "errors_by_reason"):
        assert result.summary[key] == local_run[0].summary[key]

    # Nothing left to do: a third run writes nothing and reports the same totals.
    again = mine_pairs(make_config(synth_dataset, str(out), **settings))
    assert again.shards_written == [] and again.stats == ""
    assert again.summary["pairs"] == result.summary["pairs"] and again.summary["shards_skipped"] == 3
    # Settings that change the output are refused instead of mixing two kinds of shards.
    with pytest.raises(ConfigError, match="shard_size"):
        mine_pairs(make_config(synth_dataset, str(out), shard_size=5))


# ---------------------------------------------------------------------------------------------
# Acceptance 5: corrupt JPEG, missing file, noun-less caption; through jobs/mine_pairs.py + YAML


def _load_job():
    spec = importlib.util.spec_from_file_location("mine_pairs_job", REPO / "jobs" / "mine_pairs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_input_is_recorded_and_the_run_completes(ray_session, synth_dataset, tmp_path, capsys):
    data = json.loads((synth_dataset / "annotations" / "captions.json").read_text())
    keep = [1, 2, 3, 4, 5]
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    for ann in data["annotations"]:
        if ann["image_id"] == 4:
            ann["caption"] = "It is there, right next to it."
    root = tmp_path / "bad"
    (root / "images").mkdir(parents=True)
    names = {im["id"]: im["file_name"] for im in data["images"]}
    for image_id, name in names.items():
        if image_id == 2:
            (root / "images" / name).write_bytes(b"\xff\xd8\xff\xe0" + b"this is not a jpeg" * 20)
        elif image_id != 3:  # image 3 is missing
            (root / "images" / name).write_bytes((synth_dataset / "images" / name).read_bytes())
    (root / "captions.json").write_text(json.dumps(data))
    config = {"images": str(root / "images"), "captions": str(root / "captions.json"), "output": "overridden",
              "shard_size": 2, "proposals": {"num_cpus": 0.5, "batch_size": 2}, "matching": {"num_cpus": 0.5}}
    (tmp_path / "mining.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "mined"

    status = _load_job().main(["--config", str(tmp_path / "mining.yaml"), "--output", str(out)])
    assert status == 0
    errors = {r["image_id"]: r for r in read_dir(out / "errors").to_pylist()}
    assert sorted(errors) == [2, 3, 4]
    assert errors[2]["stage"] == "load" and errors[2]["reason"].startswith("corrupt image: cannot decode")
    assert errors[2]["image_uri"] in errors[2]["reason"]
    assert errors[3]["stage"] == "load" and errors[3]["reason"].startswith("missing image: file not found")
    assert names[3] in errors[3]["reason"]
    assert errors[4]["stage"] == "nouns" and errors[4]["reason"].startswith("no nouns: ")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors_by_reason"] == {"corrupt image": 1, "missing image": 1, "no nouns": 1}
    assert summary["images_in"] == 5 and summary["images_with_pairs"] == 2
    assert set(read_dir(out / "pairs").column("image_id").to_pylist()) == {1, 5}
    printed = capsys.readouterr().out
    assert "from 2 of 5 images" in printed
    assert "3 errors (corrupt image 1, missing image 1, no nouns 1)" in printed


# ---------------------------------------------------------------------------------------------
# Preview


def test_mine_preview_contact_sheet(local_run, tmp_path):
    from ovseg_ray.cli import main as cli

    _, out = local_run
    sheet = tmp_path / "sheet.png"
    assert cli(["mine-preview", str(out), "--out", str(sheet), "--num", "5", "--seed", "1", "--tile", "64"]) == 0
    with Image.open(sheet) as img:
        assert img.size == (3 * (64 + 4) + 4, 2 * (64 + 22 + 4) + 4)  # 5 tiles: 3 columns, 2 rows
        pixels = np.asarray(img.convert("RGB"))
    first_tile = pixels[4:4 + 64, 4:4 + 64]
    assert first_tile.std() > 5  # an image crop, not an empty tile
    again = tmp_path / "again.png"
    assert cli(["mine-preview", str(out / "pairs"), "--out", str(again), "--num", "5", "--seed", "1",
                "--tile", "64"]) == 0
    assert again.read_bytes() == sheet.read_bytes()
    assert cli(["mine-preview", str(tmp_path / "nowhere"), "--out", str(again)]) == 2


def test_resuming_into_an_output_of_other_settings_is_refused(tmp_path):
    layout = OutputLayout(str(tmp_path / "mined"))
    settings = {"captions_per_image": 1, "nouns": {"compounds": True, "extra_blocklist": []}}
    layout.write_manifest(settings)
    (tmp_path / "mined" / "shards").mkdir()
    (tmp_path / "mined" / "shards" / "shard-00000.json").write_text("{}")  # one committed shard
    layout.check_manifest(settings)  # same settings: resumes
    changed = {**settings, "nouns": {"compounds": False, "extra_blocklist": []}}
    with pytest.raises(ConfigError, match=r"other settings \(nouns.compounds: True -> False\)"):
        layout.check_manifest(changed)
    assert json.loads((tmp_path / "mined" / "manifest.json").read_text()) == settings
