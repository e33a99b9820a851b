"""Mining from Parquet and WebDataset inputs (issue 17): the same images give the same pairs as from COCO
JSON, on local disk and S3; a crash part-way and a re-run lose and duplicate nothing."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ovseg_ray.config import ConfigError
from ovseg_ray.data import image_text, storage
from ovseg_ray.data.images import load_image
from ovseg_ray.data.pair_store import OutputLayout
from ovseg_ray.mining.config import MiningConfig
from ovseg_ray.mining.pipeline import InjectedFailure, mine_pairs
from same_rows import assert_same_rows

IMAGES = 4  # the first images (by id) of the synthetic dataset, one or two per input file


def file_config(fmt: str, data: str, output: str, **overrides) -> MiningConfig:
    """Small pools (one actor each) so that a run starts quickly; results never depend on pool sizes."""
    settings = {"format": fmt, "data": data, "output": output, "columns": {"key": "key"},
                "files_per_shard": 2, "load_num_cpus": 0.25,
                "proposals": {"batch_size": 2, "min_actors": 1, "max_actors": 1, "num_cpus": 0.25},
                "matching": {"batch_size": 2, "min_actors": 1, "max_actors": 1, "num_cpus": 0.5},
                **overrides}
    return MiningConfig.model_validate(settings)


def reference_rows(mined_pairs, kind: str = "pairs") -> list[dict]:
    """The COCO run's rows of the first IMAGES images, without their URIs."""
    _, out = mined_pairs
    table = OutputLayout(str(out)).read_table(kind).drop_columns(["image_uri"])
    keep = sorted(set(pq.read_table(str(out / "pairs")).column("image_id").to_pylist())
                  | set(pq.read_table(str(out / "errors")).column("image_id").to_pylist()))[:IMAGES]
    return sorted((r for r in table.to_pylist() if r["image_id"] in keep),
                  key=lambda r: (r["image_id"], r.get("noun") or r.get("stage")))


def mined_rows(output: str, kind: str = "pairs") -> list[dict]:
    table = OutputLayout(output).read_table(kind).drop_columns(["image_uri"])
    return sorted(table.to_pylist(), key=lambda r: (r["image_id"], r.get("noun") or r.get("stage")))


def coco_paths(root):
    return str(root / "images"), str(root / "annotations" / "captions.json")


def first_images(synth_dataset, tmp_path, prefix: str) -> tuple[str, str]:
    """A COCO captions JSON of the first IMAGES images (images where ``prefix`` says: local or S3)."""
    images, captions = coco_paths(synth_dataset)
    data = json.loads(storage.read_bytes(captions))
    data["images"] = sorted(data["images"], key=lambda im: im["id"])[:IMAGES]
    kept = {im["id"] for im in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept]
    if storage.is_remote(prefix):
        for image in data["images"]:
            storage.write_bytes(f"{prefix}/images/{image['file_name']}",
                                storage.read_bytes(storage.join(images, image["file_name"])))
        images = f"{prefix}/images"
    subset = tmp_path / "captions-subset.json"
    subset.write_text(json.dumps(data))
    return images, str(subset)


def crash_then_resume(config: MiningConfig) -> None:
    """One committed shard, a crash, then the re-run that finishes: the output of an uninterrupted run."""
    with pytest.raises(InjectedFailure):
        mine_pairs(config.model_copy(update={"fail_after_shards": 1}))
    layout = OutputLayout(config.output)
    assert len(layout.completed_shards()) == 1
    result = mine_pairs(config)
    assert result.summary["shards_skipped"] == 1 and len(result.shards_written) == 1
    assert result.summary["complete"] and result.summary["images_in"] == IMAGES
    fs, parts = storage.filesystem(layout.path("parts"))
    fs.invalidate_cache()
    assert not fs.exists(parts) or not fs.find(parts)  # the crashed run's parts were cleaned up


# ---------------------------------------------------------------------------------------------
# Plain pieces


def test_row_comparison_allows_batching_noise_only():
    row = {"image_id": 1, "noun": "cat", "rle_counts": "abc", "score": 0.3, "score_margin": None,
           "objectness": 0.02, "area_fraction": 0.1}
    assert_same_rows([{**row, "objectness": 0.02 + 4e-8}], [row])
    for changed in ({"objectness": 0.021}, {"score": 0.3 + 1e-7}, {"rle_counts": "abd"}, {"score_margin": 0.0}):
        with pytest.raises(AssertionError):
            assert_same_rows([{**row, **changed}], [row])
    with pytest.raises(AssertionError):
        assert_same_rows([row, row], [row])


def test_tar_members_are_counted_and_read_back_like_ray_groups_them(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in [("a/001.jpg", b"one"), ("a/001.txt", b"cap"), ("002.png", b"two"), ("README", b"x"),
                           ("003.json", b"{}")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    (tmp_path / "s.tar").write_bytes(buffer.getvalue())
    tar = str(tmp_path / "s.tar")
    assert image_text.count_images(tar) == 3  # a/001, 002, 003; README has no extension
    assert image_text.read_image_bytes(image_text.tar_member_uri(tar, "002.png")) == b"two"
    with pytest.raises(FileNotFoundError, match="file not found: 009.jpg in"):
        image_text.read_image_bytes(image_text.tar_member_uri(tar, "009.jpg"))
    (tmp_path / "broken.tar").write_bytes(buffer.getvalue()[:700])
    with pytest.raises(image_text.UnreadableInput, match="broken.tar is not a readable tar"):
        image_text.count_images(str(tmp_path / "broken.tar"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(image_text.UnreadableInput, match="broken.parquet is not a readable Parquet file"):
        image_text.count_images(str(tmp_path / "broken.parquet"))
    assert image_text.image_id("000000000123") == 123
    assert image_text.image_id("cat-7") == image_text.image_id("cat-7") != image_text.image_id("cat-8")
    assert 0 <= image_text.image_id("cat-7") < 2**63


def test_images_inside_parquet_and_tar_files_load_like_files(synth_dataset, tmp_path):
    """Pairs mined from these inputs point at their image: training and export read it from there."""
    images, captions = coco_paths(synth_dataset)
    (parquet,) = image_text.coco_to_parquet(images, captions, str(tmp_path / "pq"), 12, image_bytes=True)
    (tar,) = image_text.coco_to_webdataset(images, captions, str(tmp_path / "wds"), 12)
    expected = load_image(storage.join(images, json.loads(storage.read_bytes(captions))["images"][0]["file_name"]))
    first = json.loads(storage.read_bytes(captions))["images"][0]["id"]
    assert (load_image(image_text.parquet_member_uri(parquet, "image", "key", f"{first:012d}")) == expected).all()
    assert (load_image(image_text.tar_member_uri(tar, f"{first:012d}.jpg")) == expected).all()
    assert pq.read_table(parquet).num_rows == image_text.count_images(parquet) == 12
    assert image_text.count_images(tar) == 12


def test_config_names_the_missing_or_wrong_field(tmp_path):
    with pytest.raises(ValueError, match="format parquet needs data"):
        MiningConfig.model_validate({"format": "parquet", "output": "x"})
    with pytest.raises(ValueError, match="format coco needs images and captions"):
        MiningConfig.model_validate({"output": "x"})
    pq.write_table(pa.table({"key": ["1"], "image": [b"x"], "text": ["a dog"]}), tmp_path / "a.parquet")
    from ovseg_ray.mining.sources import plan_input

    with pytest.raises(ConfigError, match=r"has no column columns.caption='caption' \(its columns: key, image, text\)"):
        plan_input(file_config("parquet", str(tmp_path), "out"))
    with pytest.raises(ConfigError, match="columns.image='image' holds image bytes: set columns.key"):
        plan_input(file_config("parquet", str(tmp_path), "out", columns={"caption": "text"}))


# ---------------------------------------------------------------------------------------------
# Acceptance 1 + 2: the same pairs from every input, local and S3, through a crash and a re-run


def test_parquet_bytes_on_local_disk_crash_and_resume(ray_session, mined_pairs, synth_dataset, tmp_path):
    images, captions = first_images(synth_dataset, tmp_path, str(tmp_path))
    files = image_text.coco_to_parquet(images, captions, str(tmp_path / "pq"), 1, image_bytes=True)
    assert len(files) == IMAGES  # 2 shards of 2 files
    config = file_config("parquet", str(tmp_path / "pq"), str(tmp_path / "mined"))
    crash_then_resume(config)
    assert_same_rows(mined_rows(config.output), reference_rows(mined_pairs))
    assert_same_rows(mined_rows(config.output, "errors"), reference_rows(mined_pairs, "errors"))
    uris = OutputLayout(config.output).read_table("pairs").column("image_uri").to_pylist()
    assert all(u.startswith(str(tmp_path / "pq" / "part-")) and "#image[key=" in u for u in uris)


def test_webdataset_on_s3_crash_and_resume(ray_session, mined_pairs, synth_dataset, tmp_path, s3_bucket):
    images, captions = first_images(synth_dataset, tmp_path, str(tmp_path))
    image_text.coco_to_webdataset(images, captions, f"{s3_bucket}/wds", 1)
    config = file_config("webdataset", f"{s3_bucket}/wds", f"{s3_bucket}/mined")
    crash_then_resume(config)
    assert_same_rows(mined_rows(config.output), reference_rows(mined_pairs))
    assert_same_rows(mined_rows(config.output, "errors"), reference_rows(mined_pairs, "errors"))
    uris = OutputLayout(config.output).read_table("pairs").column("image_uri").to_pylist()
    assert all(u.startswith(f"{s3_bucket}/wds/") and ".tar#" in u for u in uris)


def test_parquet_paths_on_s3_and_webdataset_on_local_disk(ray_session, mined_pairs, synth_dataset, tmp_path, s3_bucket):
    images, captions = first_images(synth_dataset, tmp_path, f"{s3_bucket}/coco")
    image_text.coco_to_parquet(images, captions, f"{s3_bucket}/pq", 2, image_bytes=False)
    config = file_config("parquet", f"{s3_bucket}/pq", f"{s3_bucket}/mined", files_per_shard=1)
    mine_pairs(config)
    assert_same_rows(mined_rows(config.output), reference_rows(mined_pairs))
    assert all(u.startswith(f"{s3_bucket}/coco/images/")
               for u in OutputLayout(config.output).read_table("pairs").column("image_uri").to_pylist())

    local_images, local_captions = first_images(synth_dataset, tmp_path, str(tmp_path))
    image_text.coco_to_webdataset(local_images, local_captions, str(tmp_path / "wds"), 2, caption_member="txt")
    config = file_config("webdataset", str(tmp_path / "wds"), str(tmp_path / "mined"), files_per_shard=1)
    summary = mine_pairs(config).summary
    assert_same_rows(mined_rows(config.output), reference_rows(mined_pairs))
    assert_same_rows(mined_rows(config.output, "errors"), reference_rows(mined_pairs, "errors"))
    assert summary["shards"] == 2 and summary["images_in"] == IMAGES
