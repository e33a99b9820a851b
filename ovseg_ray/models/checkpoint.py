"""Reading weights from a local path or ``s3://`` URI and loading them with full key/shape checks."""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Mapping

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .. import storage


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message says which keys."""


class CheckpointMismatchError(CheckpointError):
    def __init__(self, source: str, missing: list[str], unexpected: list[str], mismatched: list[str]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched

        def show(title: str, keys: list[str]) -> str:
            head = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
            return f"\n  {title} ({len(keys)}): {head}" if keys else ""

        super().__init__(
            f"checkpoint {source} does not fit the model:"
            + show("missing keys", missing)
            + show("unexpected keys", unexpected)
            + show("shape mismatches", mismatched)
        )


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    header_len = int.from_bytes(data[:8], "little")
    return 0 < header_len <= len(data) - 8 and data[8:9] == b"{"


def read_checkpoint(uri: str) -> dict:
    """The raw object in a checkpoint file: safetensors, or a torch file loaded with weights_only."""
    data = storage.read_bytes(uri)
    if _is_safetensors(data):
        return load_safetensors_bytes(data)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{uri} is a pickle that needs arbitrary code to load, which is refused for safety "
            f"(torch.load weights_only=True said: {str(exc).splitlines()[0]}). Convert it once, in an "
            f"environment you trust, with `ovseg-ray convert {uri} OUT.safetensors`."
        ) from None
    except RuntimeError as exc:
        if "TorchScript" in str(exc) or "constants.pkl" in str(exc):
            raise CheckpointError(
                f"{uri} is a TorchScript archive; convert it with `ovseg-ray convert {uri} OUT.safetensors`"
            ) from None
        raise CheckpointError(f"cannot read checkpoint {uri}: {exc}") from None


def unwrap_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """Find the tensor mapping inside common wrappers ({'state_dict': ...}, {'model': ...})."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                return unwrap_state_dict(obj[key], source)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"no tensors found in checkpoint {source}")


def check_and_load(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` strictly; any missing, unexpected or mis-shaped key is an error naming it."""
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, missing, unexpected, mismatched)
    module.load_state_dict(dict(state_dict), strict=True)


def save_checkpoint(module_or_state: torch.nn.Module | Mapping[str, torch.Tensor], uri: str,
                    metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors checkpoint (tensors made contiguous and moved to CPU)."""
    state = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    storage.write_bytes(uri, save_safetensors_bytes(tensors, metadata=meta))
