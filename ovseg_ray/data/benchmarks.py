"""Benchmark class lists shipped with the package (ADE-150/847, PC-59/459, VOC-20, COCO-Stuff-171)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from . import storage

from pydantic import BaseModel

CLASSES_DIR = Path(__file__).parent / "classes"
BENCHMARK_FILES = {
    "ade20k_150": "ade20k_150.json",
    "ade20k_847": "ade20k_847.json",
    "pascal_context_59": "pascal_context_59.json",
    "pascal_context_459": "pascal_context_459.json",
    "pascal_voc_20": "pascal_voc_20.json",
    "coco_stuff_171": "coco_stuff_171.json",
}


class ClassList(BaseModel):
    name: str
    num_classes: int
    ignore_label: int
    label_format: str
    image_dir: str  # detectron2 dataset layout, relative to the dataset root
    gt_dir: str
    gt_ext: str
    classes: list[str]
    clean_classes: list[str]

    def prompt_names(self) -> list[str]:
        """Names to embed: the full source strings, stripped (unique even where first synonyms repeat)."""
        return [c.strip() for c in self.classes]


@lru_cache(maxsize=None)
def class_list(benchmark: str) -> ClassList:
    if benchmark not in BENCHMARK_FILES:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARK_FILES)}")
    data = json.loads((CLASSES_DIR / BENCHMARK_FILES[benchmark]).read_text())
    return ClassList.model_validate({k: data[k] for k in ClassList.model_fields})


def read_class_names(source: str | list[str]) -> list[str]:
    """Class names from a shipped class list (``coco_stuff_171``, ``ade20k_150``, ...), a JSON file (path or
    s3://) holding a ``classes`` list (or being one), or the names themselves; stripped, refused if empty."""
    if isinstance(source, list):
        names = source
    elif source in BENCHMARK_FILES:
        return class_list(source).prompt_names()
    else:
        try:
            data = json.loads(storage.read_bytes(source))
        except json.JSONDecodeError as exc:
            raise ValueError(f"class list {source} is not valid JSON: {exc}") from None
        names = data.get("classes") if isinstance(data, dict) else data
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"class list {source if isinstance(source, str) else ''} needs a non-empty list of "
                         f"class names".replace("list  needs", "list needs"))
    return [n.strip() for n in names]
