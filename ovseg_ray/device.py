"""Choosing a torch device, and how many GPUs a Ray task or actor should ask for.

Asking Ray for a GPU on a cluster without one makes the task wait forever, so GPU requests are
either explicit numbers from the config or resolved from what the cluster actually has.
"""

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


def worker_device(name: str = "auto") -> torch.device:
    """The device of a model inside a Ray actor or replica: ``auto`` follows the GPUs Ray granted it
    (not what the node happens to have); other names as :func:`resolve_device`."""
    import ray
    import torch

    if (name or "auto").strip().lower() == "auto" and ray.is_initialized():
        return torch.device("cuda" if ray.get_gpu_ids() else "cpu")
    return resolve_device(name)  # outside Ray: what this machine has


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


def cluster_gpus() -> float:
    """GPUs in the connected Ray cluster (0 when Ray is not initialised or has none)."""
    import ray

    if not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_can_grow() -> bool:
    """Whether the Ray cluster may still add nodes (and with them CPUs and GPUs).

    A Ray that this process started itself (a local run, the tests) is fixed: what it has now is
    all it will ever have, so a request it cannot meet would wait forever. A cluster this process
    joined (``ray job submit``, ``--address``) may have an autoscaler (the VM launcher, KubeRay) that
    adds GPU nodes when actors ask for them, so such requests are let through with a warning.
    """
    import ray

    if not ray.is_initialized():
        return False
    node = getattr(ray._private.worker, "_global_node", None)
    return node is not None and not getattr(node, "head", True)


def resolve_num_gpus(requested: float | str | None) -> float:
    """``auto``/None -> 1 GPU per worker if the cluster has GPUs now, else 0; numbers pass through.

    A positive request on a cluster with no GPU is refused when the cluster is fixed (it would hang)
    and allowed with a warning when the cluster can grow (its autoscaler may add GPU nodes). On an
    autoscaling cluster whose GPU nodes start at zero, give explicit numbers: ``auto`` sees no GPU.
    """
    available = cluster_gpus()
    if requested is None or requested == "auto":
        return 1.0 if available >= 1 else 0.0
    value = float(requested)
    if value < 0:
        raise ValueError(f"num_gpus must be >= 0, got {value}")
    if value > 0 and available == 0:
        if not cluster_can_grow():
            raise ValueError(
                f"num_gpus={value} requested but the Ray cluster has no GPUs; use num_gpus=0 or 'auto'"
            )
        logger.warning("num_gpus=%s requested and the cluster has no GPU yet: waiting for its autoscaler "
                       "to add GPU nodes", value)
    return value


def check_capacity(need_cpus: float, need_gpus: float, what: str, advice: str) -> None:
    """Refuse work whose minimum resources a fixed cluster cannot hold (it would wait forever).

    On a cluster that can grow, a shortfall is only logged: the autoscaler is expected to cover it.
    """
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    short = []
    if need_cpus > cpus + 1e-9:
        short.append(f"{need_cpus:g} CPUs (the cluster has {cpus:g})")
    if need_gpus > gpus + 1e-9:
        short.append(f"{need_gpus:g} GPUs (the cluster has {gpus:g})")
    if not short:
        return
    message = f"{what} need {' and '.join(short)} to start"
    if cluster_can_grow():
        logger.warning("%s; waiting for the cluster's autoscaler to add nodes", message)
        return
    raise ValueError(f"{message}: {advice}")
