"""Our checkpoints: reading tensors from a path or ``s3://`` URI, strict key/shape checks, safetensors writing."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping

import torch
from safetensors.torch import save as save_safetensors_bytes

from ..data import storage
from .errors import CheckpointMismatchError
from .readers import read_tensors


def read_checkpoint(uri: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (path or s3://), read without running code from it.

    safetensors, torch files with ``weights_only=True`` (state dict found under ``state_dict`` /
    ``model`` wrappers) and TorchScript archives (tensor records only); see ``ovseg_ray.weights.readers``.
    """

    return read_tensors(uri).tensors


def check_state(
    expected: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    *,
    optional: Collection[str] = (),
    unexpected_extra: Collection[str] = (),
    describe: Callable[[str], str] | None = None,
    hint: str = "",
) -> None:
    """Raise ``CheckpointMismatchError`` naming every missing, unexpected or mis-shaped key.

    ``expected`` is the target state dict (or any tensors with the target shapes); keys in
    ``optional`` may be absent; ``unexpected_extra`` are source keys that had no place at all;
    ``describe`` turns a key into the name shown (e.g. adding the key's name in the source file).
    """
    name = describe or (lambda key: key)
    missing = sorted(name(k) for k in expected if k not in state_dict and k not in optional)
    unexpected = sorted([name(k) for k in state_dict if k not in expected] + list(unexpected_extra))
    mismatched = sorted(
        f"{name(k)}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, missing, unexpected, mismatched, hint)


def save_checkpoint(module_or_state: torch.nn.Module | Mapping[str, torch.Tensor], uri: str,
                    metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors checkpoint (tensors made contiguous, moved to CPU, given storage of their own)."""
    state = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
    tensors = {k: _own_storage(v.detach().to("cpu").contiguous()) for k, v in state.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    storage.write_bytes(uri, save_safetensors_bytes(tensors, metadata=meta))


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself if it spans its whole storage, else a copy (safetensors refuses shared memory)."""
    if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone()
