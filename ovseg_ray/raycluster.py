"""Shared Ray helpers of every engine: connecting to a cluster (or starting a local one), sizing
requests for what it has (GPUs per worker, capacity checks), and the input-block rule of Ray Data.

Asking Ray for a GPU on a cluster without one makes the task wait forever, so GPU requests are
either explicit numbers from the config or resolved from what the cluster actually has.
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING

from .device import resolve_device

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None,
             object_store_memory: int | None = None) -> None:
    """Connect once per process.

    Inside ``ray job submit`` (``RAY_ADDRESS`` set) or with ``address`` this joins that cluster;
    otherwise it starts a local Ray on this machine. No ``runtime_env`` is ever passed:

    - a job's own runtime env (``--runtime-env-json``, a RayJob's ``runtimeEnvYAML``) then applies
      as it is; setting keys it may hold (``env_vars``) makes Ray refuse to merge the two;
    - Ray logs runtime envs in plain text (``runtime_env_agent.log``), so no secret may travel in
      one: a local Ray started here spawns its workers from this process, which inherit its
      environment (S3 settings, ``NLTK_DATA``) without it being written anywhere, and a cluster's
      nodes have their own (instance roles or Kubernetes secrets for S3, ``NLTK_DATA`` given to
      ``ray start`` or in the job's runtime env: see the README's "Running on a cluster").
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to Ray at %s", address)
        ray.init(address=address)
    else:
        logger.info("starting a local Ray instance")
        ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=False)


def worker_device(name: str = "auto") -> torch.device:
    """The device of a model inside a Ray actor or replica: ``auto`` follows the GPUs Ray granted it
    (not what the node happens to have); other names as :func:`resolve_device`."""
    import ray
    import torch

    if (name or "auto").strip().lower() == "auto" and ray.is_initialized():
        return torch.device("cuda" if ray.get_gpu_ids() else "cpu")
    return resolve_device(name)  # outside Ray: what this machine has


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


#: The driver puts every input block in the object store up front: cap their number on huge inputs.
MAX_INPUT_BLOCKS = 2000


def items_dataset(items: list[dict], batch_size: int):
    """A Ray dataset of ``items`` in blocks of ``batch_size`` rows, or more when that would make over
    :data:`MAX_INPUT_BLOCKS` blocks. A map stage never splits a block, so the block size bounds how
    finely work spreads over the actors."""
    import ray

    rows_per_block = max(batch_size, math.ceil(len(items) / MAX_INPUT_BLOCKS))
    return ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / rows_per_block)))
