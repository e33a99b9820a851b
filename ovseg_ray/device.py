"""Choosing a torch device, and how many GPUs a Ray task or actor should ask for.

Asking Ray for a GPU on a cluster without one makes the task wait forever, so GPU requests are
either explicit numbers from the config or resolved from what the cluster actually has.
"""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
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


def cluster_gpus() -> float:
    """GPUs in the connected Ray cluster (0 when Ray is not initialised or has none)."""
    import ray

    if not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0.0))


def resolve_num_gpus(requested: float | str | None) -> float:
    """``auto``/None -> 1 GPU per worker if the cluster has GPUs, else 0; numbers pass through.

    A positive request on a cluster with no GPU at all is refused instead of hanging.
    """
    available = cluster_gpus()
    if requested is None or requested == "auto":
        return 1.0 if available >= 1 else 0.0
    value = float(requested)
    if value < 0:
        raise ValueError(f"num_gpus must be >= 0, got {value}")
    if value > 0 and available == 0:
        raise ValueError(
            f"num_gpus={value} requested but the Ray cluster has no GPUs; use num_gpus=0 or 'auto'"
        )
    return value
