"""Writing an instance of the open world (``ovseg_ray.data.world``) as datasets in the layouts the
commands read: COCO captions and instances, label PNGs for train-maskformer, an ADE20K-style split."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from .synth import _rle, _save_jpeg
from .world import CLASSES, SEEN, STUFF, UNSEEN, captions, draw_scene

IMAGE_SHAPES = ((144, 192), (160, 160), (192, 144), (128, 192), (176, 176))


def _class_file(path: str, name: str, classes) -> None:
    with open(path, "w") as handle:
        json.dump({"name": name, "classes": list(classes)}, handle, indent=1)


def write_web(out: str, images: int, seed: int, close_up_share: float = 0.5) -> int:
    """``OUT/web/``: the CLIP pretraining corpus, the stand-in for CLIP's web data (images and captions,
    no annotations, scenes never in the train or eval split). As in web data, where object-centric photos
    are common and COCO-like scenes are not the rule, ``close_up_share`` of its scenes show one or two
    things large (``draw_scene(close_up=True)``). Returns the number of captions."""
    images_dir, notes_dir = os.path.join(out, "web", "images"), os.path.join(out, "web", "annotations")
    os.makedirs(images_dir, exist_ok=True)
    os.makedirs(notes_dir, exist_ok=True)
    rng = np.random.default_rng([seed, 2])  # a third stream: the train and eval scenes stay as they are
    entries, rows = [], []
    for image_id in range(1, images + 1):
        h, w = IMAGE_SHAPES[int(rng.integers(len(IMAGE_SHAPES)))]
        image, _, stuff, things = draw_scene(rng, h, w, close_up=bool(rng.random() < close_up_share))
        file_name = f"{image_id:012d}.jpg"
        _save_jpeg(os.path.join(images_dir, file_name), image)
        entries.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        rows += [{"id": len(rows) + 1, "image_id": image_id, "caption": text} for text in captions(rng, stuff, things)]
    info = {"description": f"ovseg-ray open world (seed {seed}): CLIP pretraining corpus", "version": "1.0"}
    with open(os.path.join(notes_dir, "captions.json"), "w") as handle:
        json.dump({"info": info, "images": entries, "annotations": rows}, handle)
    return len(rows)


def write_world(out: str, images: int = 1500, eval_images: int = 200, seed: int = 0, web_images: int = 0) -> dict:
    """Write an instance of the world for ``seed`` under ``out`` (the class list is the same for every seed)::

        OUT/classes/{all,seen,unseen}.json          class lists ({"classes": [...]})
        OUT/train/images/000000000001.jpg           training images, COCO layout
        OUT/train/annotations/captions.json         5 captions per image
        OUT/train/annotations/instances.json        seen classes only: every thing and stuff region
        OUT/train/labels/000000000001.png           seen class index per pixel (classes/seen.json), 255
                                                    where the class is unseen: like COCO-Stuff-171
        OUT/eval/images/000001.jpg, OUT/eval/labels/000001.png
                                                    held-out scenes, every class (classes/all.json)
        OUT/web/images/, OUT/web/annotations/captions.json
                                                    with ``web_images``: the CLIP pretraining corpus
                                                    (:func:`write_web`)
    """
    if images < 1 or eval_images < 1:
        raise ValueError(f"images and eval_images must be at least 1, got {images} and {eval_images}")
    folders = {k: os.path.join(out, *k.split("/")) for k in
               ("classes", "train/images", "train/annotations", "train/labels", "eval/images", "eval/labels")}
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    _class_file(os.path.join(folders["classes"], "all.json"), "open-world-all", CLASSES)
    _class_file(os.path.join(folders["classes"], "seen.json"), "open-world-seen", SEEN)
    _class_file(os.path.join(folders["classes"], "unseen.json"), "open-world-unseen", UNSEEN)
    seen_index = {name: i for i, name in enumerate(SEEN)}
    all_index = {name: i for i, name in enumerate(CLASSES)}
    categories = [{"id": i + 1, "name": n, "supercategory": "stuff" if n in STUFF else "thing"}
                  for i, n in enumerate(SEEN)]
    entries, caption_rows, instances = [], [], []
    rng = np.random.default_rng([seed, 0])
    for image_id in range(1, images + 1):
        h, w = IMAGE_SHAPES[int(rng.integers(len(IMAGE_SHAPES)))]
        image, layout, stuff, things = draw_scene(rng, h, w)
        file_name = f"{image_id:012d}.jpg"
        _save_jpeg(os.path.join(folders["train/images"], file_name), image)
        labels = np.full((h, w), 255, np.uint8)
        regions = [(name, layout == i) for i, name in enumerate(stuff)] + [(t.name, t.mask) for t in things]
        for name, mask in regions:
            if name in seen_index:
                visible = mask & ~np.any([t.mask for t in things], axis=0) if name in STUFF and things else mask
                labels[visible] = seen_index[name]
                if visible.sum() >= 20:
                    rle = _rle(visible)
                    instances.append({"id": len(instances) + 1, "image_id": image_id, "category_id": seen_index[name] + 1,
                                      "segmentation": {"size": rle["size"], "counts": rle["counts"]},
                                      "area": rle["area"], "bbox": rle["bbox"], "iscrowd": 0})
            elif name in STUFF:
                labels[mask & (labels == 255)] = 255
        Image.fromarray(labels).save(os.path.join(folders["train/labels"], f"{image_id:012d}.png"))
        entries.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for text in captions(rng, stuff, things):
            caption_rows.append({"id": len(caption_rows) + 1, "image_id": image_id, "caption": text})
    info = {"description": f"ovseg-ray open world (seed {seed})", "version": "1.0"}
    with open(os.path.join(folders["train/annotations"], "captions.json"), "w") as handle:
        json.dump({"info": info, "images": entries, "annotations": caption_rows}, handle)
    with open(os.path.join(folders["train/annotations"], "instances.json"), "w") as handle:
        json.dump({"info": info, "images": entries, "annotations": instances, "categories": categories}, handle)
    rng = np.random.default_rng([seed, 1])  # another stream: evaluation scenes are never training scenes
    for index in range(1, eval_images + 1):
        h, w = IMAGE_SHAPES[int(rng.integers(len(IMAGE_SHAPES)))]
        image, layout, stuff, things = draw_scene(rng, h, w)
        labels = np.zeros((h, w), np.uint8)
        for i, name in enumerate(stuff):
            labels[layout == i] = all_index[name]
        for thing in things:
            labels[thing.mask] = all_index[thing.name]
        _save_jpeg(os.path.join(folders["eval/images"], f"{index:06d}.jpg"), image)
        Image.fromarray(labels).save(os.path.join(folders["eval/labels"], f"{index:06d}.png"))
    web_captions = write_web(out, web_images, seed) if web_images else 0
    return {"out": out, "seed": seed, "images": images, "eval_images": eval_images, "web_images": web_images,
            "web_captions": web_captions, "captions": len(caption_rows),
            "instances": len(instances), "classes": len(CLASSES), "seen": len(SEEN), "unseen": len(UNSEEN)}
