"""Published weights: OVSeg release checkpoints, OpenAI / OpenCLIP CLIP weights, our own checkpoints.

- ``read_tensors``: the tensors of a file (safetensors, torch ``weights_only``, TorchScript data only).
- ``map_to_ours``: rename any supported layout into ours (``keymaps``), keeping source names for errors.
- ``load_model_weights`` / ``load_clip_weights``: strict loads into an ``OVSegModel``.
- ``load_manifest``: the key -> shape manifests of the release checkpoints (``manifests/``).
"""

from .checkpoint import read_checkpoint, save_checkpoint
from .errors import CheckpointError, CheckpointMismatchError
from .keymaps import CLIP, OURS, RELEASE, MappedState, map_to_ours
from .loading import LoadReport, load_clip_weights, load_model_weights, read_mapped
from .manifest import Manifest, load_manifest, manifest_presets, match_release_preset
from .readers import RawCheckpoint, read_tensors

__all__ = [
    "CheckpointError", "CheckpointMismatchError", "read_checkpoint", "save_checkpoint",
    "CLIP", "OURS", "RELEASE", "LoadReport", "Manifest", "MappedState", "RawCheckpoint",
    "load_clip_weights", "load_manifest", "load_model_weights", "manifest_presets",
    "map_to_ours", "match_release_preset", "read_mapped", "read_tensors",
]
