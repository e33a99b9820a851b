"""The open world's CLIP pretraining corpus (``world/web``) and pretrain-clip's decode-once views."""

import hashlib
import json

import numpy as np
import pytest
import torch

from ovseg_ray.data.world import draw_scene
from ovseg_ray.data.world_dataset import write_world
from ovseg_ray.models.clip import CLIP_MEAN, CLIP_STD, clip_tokenizer
from ovseg_ray.training.pretrain import cache_size, decode_captioned, draw_views


def _digests(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_web_corpus_is_a_stream_of_its_own(tmp_path):
    write_world(str(tmp_path / "plain"), images=6, eval_images=3, seed=4)
    summary = write_world(str(tmp_path / "web"), images=6, eval_images=3, seed=4, web_images=10)
    plain, web = _digests(tmp_path / "plain"), _digests(tmp_path / "web")
    # Adding the corpus changes no train or eval file: earlier runs' scenes stay the same.
    assert {k: v for k, v in web.items() if not k.startswith("web/")} == plain
    assert sum(k.startswith("web/images/") for k in web) == 10 and summary["web_captions"] == 50
    captions = json.loads((tmp_path / "web" / "web" / "annotations" / "captions.json").read_text())
    assert [len([a for a in captions["annotations"] if a["image_id"] == i["id"]]) for i in captions["images"]] == [5] * 10
    train = {i["file_name"]: i for i in json.loads(
        (tmp_path / "web" / "train" / "annotations" / "captions.json").read_text())["images"]}
    train_bytes = {web[f"train/images/{name}"] for name in train}
    assert not train_bytes & {v for k, v in web.items() if k.startswith("web/images/")}  # scenes of its own
    again = tmp_path / "again"
    write_world(str(again), images=6, eval_images=3, seed=4, web_images=10)
    assert _digests(again) == web  # deterministic


def test_close_ups_show_one_or_two_large_things():
    rng = np.random.default_rng(0)
    ordinary = [draw_scene(rng, 160, 160)[3] for _ in range(40)]
    close = [draw_scene(rng, 160, 160, close_up=True)[3] for _ in range(40)]
    assert all(1 <= len(things) <= 2 for things in close if things)
    largest = [np.mean([max((t.area for t in things), default=0.0) for things in scenes]) for scenes in (ordinary, close)]
    assert largest[1] > 3 * largest[0], largest


def test_decode_once_keeps_every_caption_and_names_unreadable_images(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((30, 50, 3), 200, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    captions = np.empty(2, dtype=object)
    captions[:] = [["A red ball.", "Two cats."], ["A tree."]]
    out = decode_captioned({"image_uri": np.array([str(tmp_path / "a.png"), str(tmp_path / "b.jpg")], dtype=object),
                            "captions": captions}, "ovseg-tiny-vit", 64, max_captions=3)
    side = cache_size(64)
    assert side == 68 and out["image"].shape == (2, side, side, 3) and out["image"].dtype == np.uint8
    assert (out["image"][0] == 200).all()
    assert out["ok"].tolist() == [True, False] and "b.jpg" in out["error"][1] and out["error"][0] == ""
    assert out["num_captions"].tolist() == [2, 1]
    tokenizer = clip_tokenizer("ovseg-tiny-vit")
    assert np.array_equal(out["tokens"][0, :2], tokenizer(["A red ball.", "Two cats."]).numpy())
    assert np.array_equal(out["tokens"][1, 0], tokenizer(["A tree."]).numpy()[0])
    assert not out["tokens"][0, 2].any() and not out["tokens"][1, 1:].any()


def test_views_crop_at_least_90_percent_and_draw_each_caption():
    side, size = cache_size(64), 64
    image = torch.zeros(1, side, side, 3, dtype=torch.uint8)
    image[:, :, side // 2:] = 255  # left half black, right half white
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    tokens = torch.arange(3 * 4, dtype=torch.int32).view(1, 3, 4)
    generator = torch.Generator().manual_seed(0)
    picks, white = set(), []
    for _ in range(60):
        view, token = draw_views(image, tokens, torch.tensor([2]), size, generator)
        assert view.shape == (1, 3, size, size) and token.dtype == torch.int64
        pixels = view[0] * std + mean  # back to 0-255
        assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
        white.append(float((pixels[0] > 127.5).float().mean()))
        picks.add(tuple(token[0].tolist()))
    # A crop of >= 90 % of the area (>= 94.9 % of each side) keeps the boundary near the middle.
    crop = int(side * 0.9 ** 0.5)
    assert all(abs(w - 0.5) <= (side - crop) / crop / 2 + 1 / size for w in white), (min(white), max(white))
    assert len(set(round(w, 3) for w in white)) > 3  # the crops vary
    assert picks == {(0, 1, 2, 3), (4, 5, 6, 7)}  # only the image's two captions, both drawn
    again = draw_views(image, tokens, torch.tensor([2]), size, torch.Generator().manual_seed(0))
    first = draw_views(image, tokens, torch.tensor([2]), size, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_synth_refuses_web_images_outside_the_open_world(tmp_path, capsys):
    from ovseg_ray.cli import main

    assert main(["synth", "--images", "2", "--web-images", "3", "--out", str(tmp_path / "x")]) != 0
    assert "--web-images 3" in capsys.readouterr().err
    with pytest.raises(ValueError):
        write_world(str(tmp_path / "y"), images=0)
