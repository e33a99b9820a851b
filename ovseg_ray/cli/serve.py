"""``ovseg-ray serve``: run the HTTP segmentation service on Ray Serve until Ctrl-C.

    ovseg-ray serve --config serve.yaml
    ovseg-ray serve --model.preset tiny --http.port 8000 --classifier.num-replicas 2

The config is a YAML of ServeConfig fields (see docs/serving.md) or a ``serve deploy`` file such as
cluster/serve_config.yaml; flags override single fields of the former.
"""

from __future__ import annotations

import argparse
import os

from ..config import overrides_from_args
from ..serving.config import ServeConfig, load_serve_config
from .common import add_config_command, refuse_relative_paths_in_job


def register(subparsers) -> None:
    add_config_command(subparsers, "serve", "run the HTTP segmentation service (blocks until Ctrl-C)", __doc__,
                       ServeConfig, run, ray_address=True)


def run(args: argparse.Namespace) -> int:
    config = load_serve_config(args.config, overrides_from_args(args))
    refuse_relative_paths_in_job({"limits.image_uri_prefixes": config.limits.image_uri_prefixes})
    from ..raycluster import init_ray
    from ..serving.app import deploy, serve_until_stopped

    joined = bool(args.address or os.environ.get("RAY_ADDRESS"))
    init_ray(args.address)
    url = deploy(config)
    print(f"OVSeg service {config.app_name!r} ({config.model.preset}) running at {url}  "
          f"(API docs: {url}docs); press Ctrl-C to stop", flush=True)
    serve_until_stopped(config, shutdown_serve=not joined)
    return 0
