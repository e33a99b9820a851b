"""The Python client of the HTTP service, kept importable from here: it lives in ``ovseg_ray.serving.client``."""

from .serving.client import OVSegClient, OVSegError

__all__ = ["OVSegClient", "OVSegError"]
