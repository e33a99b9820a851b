"""Connecting to Ray: the cluster a job was submitted to, or a local one for single-machine runs."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None,
             object_store_memory: int | None = None) -> None:
    """Connect once per process.

    Inside ``ray job submit`` (``RAY_ADDRESS`` set) or with ``address`` this joins that cluster;
    otherwise it starts a local Ray on this machine. Environment variables that the workers need
    (S3 endpoint and credentials, NLTK data) are forwarded to them.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    forwarded = {
        key: os.environ[key]
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                    "AWS_ENDPOINT_URL", "NLTK_DATA")
        if key in os.environ
    }
    kwargs = {"runtime_env": {"env_vars": forwarded}} if forwarded else {}
    if address:
        logger.info("connecting to Ray at %s", address)
        ray.init(address=address, **kwargs)
    else:
        logger.info("starting a local Ray instance")
        ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=False, **kwargs)
