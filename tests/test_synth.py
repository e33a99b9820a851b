"""The synthetic dataset's scenes, labels and captions agree with each other."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from ovseg_ray.data.benchmarks import class_list
from ovseg_ray.data.synth import STUFF, THINGS, UNANNOTATED


def test_captions_name_what_is_visible(synth_dataset):
    captions = COCO(str(synth_dataset / "annotations" / "captions.json"))
    instances = COCO(str(synth_dataset / "annotations" / "instances.json"))
    coco171 = class_list("coco_stuff_171").clean_classes
    stuff_by_coco = {spec[0]: name for name, spec in STUFF.items()}
    plural_seen = unannotated_seen = False
    for image_id in captions.getImgIds():
        text = " ".join(a["caption"].lower() for a in captions.loadAnns(captions.getAnnIds(imgIds=[image_id])))
        for ann in instances.loadAnns(instances.getAnnIds(imgIds=[image_id])):
            assert instances.loadCats([ann["category_id"]])[0]["name"] in text
        labels = np.asarray(Image.open(synth_dataset / "stuffthingmaps" / f"{image_id:012d}.png"))
        for value in np.unique(labels):
            if value == 255:
                continue
            name = coco171[value]
            assert stuff_by_coco.get(name, name.replace("sports ", "")) in text, (image_id, name)
        plural_seen |= any(f"{n}s " in text or f"{n}s." in text for n in THINGS)
        unannotated_seen |= any(n in text for n in UNANNOTATED)
    assert plural_seen and unannotated_seen


def test_evaluation_split_uses_ade150_indices(synth_dataset):
    ade = class_list("ade20k_150").clean_classes
    allowed = {ade.index(spec[1]) for spec in STUFF.values()} | {
        ade.index(spec[1]) for spec in THINGS.values() if spec[1]} | {255}
    labels_dir = synth_dataset / "ADEChallengeData2016" / "annotations_detectron2" / "validation"
    images_dir = synth_dataset / "ADEChallengeData2016" / "images" / "validation"
    files = sorted(labels_dir.glob("*.png"))
    assert len(files) == 4
    for path in files:
        labels = np.asarray(Image.open(path))
        image = Image.open(images_dir / path.name.replace(".png", ".jpg"))
        assert labels.dtype == np.uint8 and labels.shape == (image.height, image.width)
        assert set(np.unique(labels)) <= allowed
        assert (labels != 255).mean() > 0.5


def test_instances_are_coco_format(synth_dataset):
    data = json.loads((synth_dataset / "annotations" / "instances.json").read_text())
    assert {c["name"] for c in data["categories"]} == set(THINGS)
    assert all(a["iscrowd"] == 0 and len(a["bbox"]) == 4 for a in data["annotations"])
