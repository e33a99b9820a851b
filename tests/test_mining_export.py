"""`mine-export` (issue 17, acceptance 5): masked crops + nouns as WebDataset shards and open_clip's CSV,
read back by Ray Data's WebDataset reader with the right count and crop sizes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from ovseg_ray.data.pair_store import OutputLayout
from ovseg_ray.mining.export import FILL, masked_crop


def test_masked_crop_by_hand():
    image = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    mask = np.zeros((5, 6), bool)
    mask[1, 2] = mask[3, 4] = True  # box rows 1..3, columns 2..4
    crop = masked_crop(image, mask)
    assert crop.shape == (3, 3, 3)
    assert (crop[0, 0] == image[1, 2]).all() and (crop[2, 2] == image[3, 4]).all()
    assert (crop[1, 1] == FILL).all() and (crop[0, 2] == FILL).all()
    with pytest.raises(ValueError, match="empty mask"):
        masked_crop(image, np.zeros((5, 6), bool))


def test_export_read_back_by_ray_datas_webdataset_reader(ray_session, mined_pairs, tmp_path, capsys):
    import ray.data

    from ovseg_ray.cli import main

    _, mined = mined_pairs
    pairs = OutputLayout(str(mined)).read_table("pairs").to_pylist()
    exported = [p for p in pairs if not p["duplicate_of"]]
    out = tmp_path / "export"
    assert main(["mine-export", str(mined), "--out", str(out), "--pairs-per-shard", "7"]) == 0
    assert f"exported {len(exported)} masked crops" in capsys.readouterr().out
    tars = sorted((out / "webdataset").glob("*.tar"))
    assert len(tars) == -(-len(exported) // 7)

    samples = ray.data.read_webdataset([str(t) for t in tars], decoder=None).take_all()
    assert len(samples) == len(exported)
    expected = sorted((p["image_id"], p["noun"], int(p["bbox"][2]), int(p["bbox"][3])) for p in exported)
    got = []
    for sample in samples:
        with Image.open(io.BytesIO(sample["jpg"])) as crop:
            width, height = crop.size
        meta = json.loads(sample["json"])
        assert sample["txt"].decode() == meta["noun"]
        got.append((meta["image_id"], meta["noun"], width, height))
    assert sorted(got) == expected  # every pair once, each crop its mask's box

    lines = (out / "csv" / "train.csv").read_text().splitlines()
    assert lines[0] == "filepath\ttitle" and len(lines) == 1 + len(exported)
    for line in lines[1:]:
        path, noun = line.split("\t")
        assert Image.open(path).size[0] > 0 and noun in {p["noun"] for p in exported}
