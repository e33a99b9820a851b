"""Deploy the OVSeg HTTP service on a Ray cluster, as a Ray job.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/deploy_serve.py --config cluster/serve_config.yaml

The config is a ``serve deploy`` file (cluster/serve_config.yaml) or a YAML of ServeConfig fields.
The job deploys the application, waits until every replica runs, prints the URL and the replica
counts, and exits: the application keeps running in the cluster's Serve (remove it with
``serve delete APP``). Without a cluster (no RAY_ADDRESS, no --address) it starts a local Ray and
keeps serving until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="serve deploy file or ServeConfig YAML")
    parser.add_argument("--app", default=None, help="application name to pick from a serve deploy file")
    parser.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS of the job)")
    args = parser.parse_args(argv)

    from ovseg_ray.cli import report_errors

    return report_errors(lambda: _deploy(args))


def _deploy(args: argparse.Namespace) -> int:
    from ray import serve

    from ovseg_ray.cli.common import refuse_relative_paths_in_job
    from ovseg_ray.raycluster import init_ray
    from ovseg_ray.serving.app import deploy, serve_until_stopped
    from ovseg_ray.serving.config import load_serve_config

    config = load_serve_config(args.config, app_name=args.app)
    refuse_relative_paths_in_job({"limits.image_uri_prefixes": config.limits.image_uri_prefixes})
    joined = bool(args.address or os.environ.get("RAY_ADDRESS"))
    init_ray(args.address)
    url = deploy(config)  # refuses what the cluster cannot hold, GPUs it does not have, missing weights
    status = serve.status().applications[config.app_name]
    replicas = ", ".join(f"{name} {d.replica_states.get('RUNNING', 0)}" for name, d in status.deployments.items())
    print(f"deployed {config.app_name!r} ({config.model.preset}): {status.status.value}; running replicas: {replicas}")
    print(f"URL: {url} (on the head node; API docs at {url}docs)", flush=True)
    if joined:
        return 0
    print("no Ray cluster given: serving from this local Ray until Ctrl-C", flush=True)
    serve_until_stopped(config, shutdown_serve=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
