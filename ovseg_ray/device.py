"""Choosing a torch device, and telling an accelerator's failure from an input's (no Ray here: the
Ray side, how many GPUs to ask for and which one an actor got, is in ``ovseg_ray.raycluster``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    import torch

    if isinstance(name, torch.device):
        return name
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA GPU is available here")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None


def is_device_failure(exc: BaseException) -> bool:
    """A failure of the accelerator rather than of the input (out of memory, a broken CUDA context).

    Per-image error handlers re-raise these: recording them as the image's fault would make a
    transient or machine-wide problem permanent in the output; failing lets the job be re-run.
    """
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(key in text for key in ("CUDA", "cuDNN", "NCCL", "cuBLAS"))
