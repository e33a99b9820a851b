"""HTTP service on Ray Serve: ingress (FastAPI) -> mask proposals -> batched region classifier.

``ovseg_ray.serving:app_builder`` is the ``import_path`` for ``serve deploy``; :func:`deploy` runs the
service on the connected Ray. Ray and FastAPI are imported only when those are used, so that
reading a :class:`ServeConfig` stays cheap.
"""

from __future__ import annotations

from .config import ServeConfig, load_serve_config

__all__ = ["ServeConfig", "app_builder", "build_app", "deploy", "load_serve_config"]


def __getattr__(name: str):
    if name in ("app_builder", "build_app", "deploy"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
