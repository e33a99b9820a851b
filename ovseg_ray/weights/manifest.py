"""The key manifests of the OVSeg release checkpoints (``manifests/*.json``, see README.md there)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

MANIFEST_DIR = Path(__file__).parent / "manifests"
MANIFEST_FILES = {"r101c-vitb16": "ovseg_r101c_vitb16.json", "swinb-vitl14": "ovseg_swinb_vitl14.json"}


@dataclass(frozen=True)
class Manifest:
    preset: str
    release_files: tuple[str, ...]
    keys: dict[str, tuple[int, ...]]  # release key -> shape
    dtypes: dict[str, str]  # non-float entries, e.g. Swin's relative_position_index: int64
    not_loaded: dict[str, str]  # release key -> why it has no place in the model

    def differences(self, shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str], list[str]]:
        """(missing, unexpected, mis-shaped) release keys of a checkpoint with these shapes."""
        missing = sorted(k for k in self.keys if k not in shapes and k not in self.not_loaded)
        unexpected = sorted(k for k in shapes if k not in self.keys)
        mismatched = sorted(k for k, s in shapes.items() if k in self.keys and tuple(s) != self.keys[k])
        return missing, unexpected, mismatched


def manifest_presets() -> list[str]:
    return sorted(MANIFEST_FILES)


@lru_cache(maxsize=None)
def load_manifest(preset: str) -> Manifest:
    if preset not in MANIFEST_FILES:
        raise ValueError(f"no release manifest for preset {preset!r}; manifests exist for "
                         f"{', '.join(manifest_presets())}")
    data = json.loads((MANIFEST_DIR / MANIFEST_FILES[preset]).read_text())
    return Manifest(
        preset=data["preset"],
        release_files=tuple(data["release_files"]),
        keys={k: tuple(v) for k, v in data["keys"].items()},
        dtypes=dict(data["dtypes"]),
        not_loaded=dict(data["not_loaded"]),
    )


def match_release_preset(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The preset whose release manifest these release-layout shapes fit exactly, if any."""
    for preset in manifest_presets():
        if not any(load_manifest(preset).differences(shapes)):
            return preset
    return None
