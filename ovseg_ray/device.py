"""Choosing a torch device, and telling an accelerator's failure from an input's (no Ray here: the
Ray side, how many GPUs to ask for and which one an actor got, is in ``ovseg_ray.raycluster``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
T = TypeVar("T")


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



def batch_or_none(run: Callable[[], T], count: int, what: str,
                  errors: tuple[type[BaseException], ...] = (Exception,)) -> T | None:
    """``run()`` on a batch of ``count`` inputs, or None when it fails on an input (``errors``): the
    caller then takes each input alone, so that only the bad one is recorded. A failure of the
    device is raised (:func:`is_device_failure`): a re-run picks the inputs up."""
    try:
        return run()
    except errors as exc:
        if is_device_failure(exc):
            raise
        logger.warning("%s of a batch of %d failed together (%s); each goes alone", what, count, exc)
        return None

#: The precisions every engine accepts (``ModelConfig.precision``, the training configs' ``optim.precision``).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype(precision: str, device: torch.device, allow_cpu: bool = True) -> torch.dtype | None:
    """The dtype the networks autocast to on ``device`` (None = plain fp32).

    ``auto``: bf16 on a CUDA GPU that supports it (fp16 on one that does not), fp32 on the CPU.
    ``bf16``/``fp16`` are honoured on the CPU too (CPU autocast), unless ``allow_cpu`` is off, where
    they are refused (the training steps: mixed precision there is a GPU feature).
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision == "fp32":
        return None
    if device.type != "cuda":
        if precision == "auto":
            return None
        if not allow_cpu:
            raise ValueError(f"precision {precision} needs a CUDA device, this worker runs on {device}")
    elif precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(dtype: torch.dtype | None, device: torch.device):
    """A context that autocasts to ``dtype`` on ``device``'s type, or does nothing for None (fp32)."""
    import torch

    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)
