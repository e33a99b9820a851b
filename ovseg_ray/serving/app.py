"""Ray Serve wiring: ingress (FastAPI) -> MaskProposer (MaskFormer, fusion) -> RegionClassifier (masked CLIP).

The ingress validates and decodes the request and encodes the outputs. The proposal replica runs
the MaskFormer, keeps the mask logits, sends the packed binary masks to the region classifier,
then ensembles and fuses; the label map goes back to the ingress. The region classifier batches the
regions of concurrent requests (``@serve.batch``) into one masked-CLIP forward. Each deployment has
its own replicas, autoscaling and resources (see :class:`~ovseg_ray.serving.config.ServeConfig`).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at runtime.
import asyncio
import logging
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.context import _get_global_client  # private: the controller client that `serve deploy` uses
from ray.serve.exceptions import BackPressureError
from ray.serve.schema import APIType, ServeDeploySchema
from ray.serve.handle import DeploymentHandle
from ray.util import metrics

from .. import __version__
from ..data import storage
from ..models.ovseg import resolve_weights
from ..outputs import OUTPUT_KINDS
from .api import (
    RequestError,
    load_request_image,
    parse_segment_request,
    read_body,
    render_json,
    response_body,
)
from ..raycluster import check_capacity, resolve_num_gpus, worker_device
from .config import (
    APP_ARGS,
    STAGE_DEPLOYMENTS,
    DeploymentSettings,
    Limits,
    ServeConfig,
    application_entry,
    config_from_app_args,
    deployment_entry,
    parse_serve_config,
)
from .openapi import describe_limits, segment_docs
from .stages import ProposalStage, RegionRequest, RegionResult, RegionStage, SegmentOutput, load_segmenter

logger = logging.getLogger("ray.serve")

INGRESS, PROPOSER, CLASSIFIER = (STAGE_DEPLOYMENTS[stage] for stage in ("ingress", "proposer", "classifier"))

api = FastAPI(
    title="OVSeg open-vocabulary segmentation",
    version=__version__,
    description="Segment an image into any list of class names (OVSeg: MaskFormer proposals + mask-adapted CLIP).",
)



def _replica_settings(config: dict) -> ServeConfig:
    """What a replica reads: the application's args (its stages' options are Serve's business)."""
    return parse_serve_config(config, "replica settings", stages_elsewhere=True)


def _warn_random_weights(config: ServeConfig) -> None:
    if resolve_weights(config.model.preset, config.model.weights) is None:
        logger.warning("preset %s is serving RANDOM weights (model.weights is not set)", config.model.preset)


def _replica_counts() -> dict:
    """Running replicas and status of each deployment of this application, from the Serve controller."""
    app_name = serve.get_replica_context().app_name
    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {
        name: {"status": str(getattr(d.status, "value", d.status)), "running": int(d.replica_states.get("RUNNING", 0))}
        for name, d in app.deployments.items()
    }


@serve.deployment(name=CLASSIFIER)
class RegionClassifier:
    """Masked-CLIP region embeddings; concurrent requests share one encoder forward."""

    def __init__(self, config: dict):
        settings = _replica_settings(config)
        _warn_random_weights(settings)
        self.stage = RegionStage(load_segmenter(settings.model, "regions", worker_device(settings.model.device)), settings.batching.max_regions_per_forward)
        self.batching = settings.batching.enabled
        self.embed_batch.set_max_batch_size(settings.batching.max_batch_requests)
        self.embed_batch.set_batch_wait_timeout_s(settings.batching.batch_wait_timeout_s)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="regions")
        self._batch_requests = metrics.Histogram(
            "ovseg_region_batch_requests", description="requests per region-classifier batch",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        )
        self._batch_regions = metrics.Histogram(
            "ovseg_region_batch_regions", description="regions per region-classifier batch",
            boundaries=[16, 64, 128, 256, 512, 1024, 2048],
        )

    async def embed(self, request: RegionRequest) -> RegionResult:
        if self.batching:
            return await self.embed_batch(request)
        return (await self._run([request]))[0]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def embed_batch(self, requests: list[RegionRequest]) -> list[RegionResult]:
        return await self._run(requests)

    async def _run(self, requests: list[RegionRequest]) -> list[RegionResult]:
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, self.stage.embed_batch, requests)
        self._batch_requests.observe(len(requests))
        self._batch_regions.observe(results[0].batch_regions if results else 0)
        return results


@serve.deployment(name=PROPOSER)
class MaskProposer:
    """MaskFormer proposals and class-name embeddings (cached here), then ensemble and fusion."""

    def __init__(self, classifier: DeploymentHandle, config: dict):
        settings = _replica_settings(config)
        _warn_random_weights(settings)
        self.stage = ProposalStage(load_segmenter(settings.model, "proposals", worker_device(settings.model.device)))
        self.classifier = classifier
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="proposals")

    async def segment(self, image: np.ndarray, classes: list[str], lam: float, threshold: float,
                      mode: str = "eval") -> SegmentOutput:
        loop = asyncio.get_running_loop()
        pending = await loop.run_in_executor(self._executor, self.stage.propose, image, classes, lam, threshold, mode)
        regions = None
        if pending.region_request is not None:
            start = time.perf_counter()
            regions = await self.classifier.embed.remote(pending.region_request)
            pending.timings["regions_s"] = time.perf_counter() - start
            pending.timings["region_forward_s"] = regions.forward_s
        return await loop.run_in_executor(self._executor, self.stage.finish, pending, regions)


@serve.deployment(name=INGRESS)
@serve.ingress(api)
class OVSegIngress:
    """HTTP API: validation, limits, decoding, output encoding; the model runs downstream."""

    def __init__(self, proposer: DeploymentHandle, config: dict):
        from ..models.ovseg import load_preset

        self.config = _replica_settings(config)
        self.proposer = proposer
        self.preset = load_preset(self.config.model.preset)
        self.defaults = {
            "lambda": self.preset.ensemble_lambda,
            "mask_threshold": self.preset.mask_threshold,
            "outputs": list(self.config.default_outputs),
        }
        describe_limits(api, self.config.limits)
        self.status_counts: Counter[int] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self._requests = metrics.Counter(
            "ovseg_segment_requests", description="POST /v1/segment by HTTP status", tag_keys=("status",)
        )
        self._latency = metrics.Histogram(
            "ovseg_segment_latency_s", description="POST /v1/segment latency (successful requests)",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30],
        )

    def _reply(self, status: int, body: dict) -> Response:
        """Encode first, count after: what is counted is the status the client gets."""
        status, content = render_json(status, body)
        self.status_counts[status] += 1
        self._requests.inc(tags={"status": str(status)})
        return Response(content, status_code=status, media_type="application/json")

    @api.post("/v1/segment", summary="Segment an image into the given classes", **segment_docs(Limits()))
    async def segment(self, request: Request) -> Response:
        start = time.perf_counter()
        try:
            status, body = await self._segment(request, start)
        except Exception as exc:  # a bug anywhere: answer in JSON, count it, keep the service up
            logger.exception("POST /v1/segment failed")
            status, body = 500, {"detail": f"internal error ({type(exc).__name__})"}
        if status == 200:
            self._latency.observe(time.perf_counter() - start)
        return self._reply(status, body)

    async def _segment(self, request: Request, start: float) -> tuple[int, dict]:
        limits = self.config.limits
        try:
            body = await read_body(request.stream(), request.headers.get("content-length"), limits.max_request_bytes)
            content_type = request.headers.get("content-type", "")
            parsed = await asyncio.to_thread(parse_segment_request, body, content_type, limits, self.defaults)
            del body
            image = await asyncio.to_thread(load_request_image, parsed, limits)
        except RequestError as exc:
            return exc.status, {"detail": exc.message}
        decode_s = time.perf_counter() - start
        try:
            output = await self.proposer.segment.remote(image, parsed.classes, parsed.lam, parsed.mask_threshold,
                                                        parsed.mode)
        except BackPressureError as exc:
            return 503, {"detail": f"the service is overloaded, retry later ({exc})"}
        except (RayActorError, ActorUnavailableError) as exc:
            logger.warning("model replica unavailable: %s", exc)
            return 503, {"detail": "a model replica is unavailable (restarting?), retry later"}
        encode_start = time.perf_counter()
        result = await asyncio.to_thread(response_body, image, parsed, output, {"decode_s": decode_s})
        result["timings"]["outputs_s"] = round(time.perf_counter() - encode_start, 6)
        result["timings"]["total_s"] = round(time.perf_counter() - start, 6)
        if output.region_batch_requests:
            self.batch_sizes[output.region_batch_requests] += 1
        return 200, result

    @api.get("/healthz", summary="Liveness")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/info", summary="Model, limits, replicas and observed region batching")
    async def info(self) -> dict:
        preset = self.preset
        return {
            "model": {
                "preset": self.config.model.preset,
                "weights": self.config.model.weights,
                "clip_arch": preset.clip_arch,
                "num_queries": preset.maskformer.num_queries,
                "min_size": preset.min_size,
                "max_size": preset.max_size,
                "templates": preset.templates,
                "defaults": {"lambda": self.defaults["lambda"], "mask_threshold": self.defaults["mask_threshold"]},
            },
            "limits": self.config.limits.model_dump(),
            "outputs": list(OUTPUT_KINDS),
            "default_outputs": self.defaults["outputs"],
            "region_batching": {
                **self.config.batching.model_dump(),
                # requests per classifier batch, as seen in the responses through this ingress replica
                "observed_batch_requests": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "max_observed_batch_requests": max(self.batch_sizes, default=0),
            },
            "replicas": await asyncio.to_thread(_replica_counts),
            "requests_by_status": {str(k): v for k, v in sorted(self.status_counts.items())},
        }


def deployment_options(stage: str, settings: DeploymentSettings, num_gpus: float | None = None) -> dict[str, Any]:
    """Keyword arguments for ``Deployment.options`` (``num_gpus: auto`` resolved on the cluster now)."""
    gpus = resolve_num_gpus(settings.num_gpus) if num_gpus is None else num_gpus
    return {key: value for key, value in deployment_entry(stage, settings, gpus).items() if key != "name"}


def build_app(config: ServeConfig) -> serve.Application:
    """The bound application; per-deployment options come from ``config`` (``num_gpus: auto`` resolved now).
    Replicas are given only the application's args (what a deploy file's ``args`` hold)."""
    settings = config.model_dump(mode="json", by_alias=True, include=set(APP_ARGS))
    classifier = RegionClassifier.options(**deployment_options("classifier", config.classifier)).bind(settings)
    proposer = MaskProposer.options(**deployment_options("proposer", config.proposer)).bind(classifier, settings)
    return OVSegIngress.options(**deployment_options("ingress", config.ingress)).bind(proposer, settings)


def app_builder(args: dict) -> serve.Application:
    """The ``import_path`` of serve deploy files, also for ``serve run ovseg_ray.serving:app_builder
    [FIELD=VALUE ...]`` (see :func:`config_from_app_args`). The stages' replicas and resources come
    from the deploy file's ``deployments`` when it has them."""
    return build_app(config_from_app_args(args))


def __getattr__(name: str):
    """``ovseg_ray.serving.app:app``, the application with the default ServeConfig, for what wants an
    Application rather than a builder (``serve build``, ``serve run``): edit the built file's
    ``deployments`` (replicas, resources); the model and limits come from ``app_builder``'s args."""
    if name == "app":
        return build_app(ServeConfig())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_serve_capacity(config: ServeConfig, num_gpus: dict[str, float]) -> None:
    """Refuse, on a Ray that cannot grow, replicas it could never schedule (Serve would wait forever)."""
    stages = {stage: (config.replicas_to_start(stage), getattr(config, stage).num_cpus, num_gpus[stage])
              for stage in STAGE_DEPLOYMENTS}
    what = "the service's replicas (" + ", ".join(
        f"{stage} {count} x {cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
        for stage, (count, cpus, gpus) in stages.items()) + ")"
    check_capacity(sum(n * cpus for n, cpus, _ in stages.values()), sum(n * gpus for n, _, gpus in stages.values()),
                   what, "lower --ingress.num-cpus, --proposer.num-cpus or --classifier.num-cpus (fractions are "
                         "fine), the GPUs (--STAGE.num-gpus) or the replicas (--STAGE.num-replicas, "
                         "--STAGE.autoscaling.min-replicas / initial-replicas)")


def _declared_applications(client) -> list[dict]:
    """The configs of the applications deployed from a config (``serve deploy``) on this Serve: applying
    a config replaces that whole set, so the others must be applied again unchanged."""
    details = client.get_serve_details().get("applications", {})
    return [app["deployed_app_config"] for app in details.values()
            if app.get("source") == APIType.DECLARATIVE.value and app.get("deployed_app_config")]


def _wait_until_running(config: ServeConfig) -> None:
    """Until the application runs with every fixed replica count reached; a failed deploy raises."""
    fixed = {STAGE_DEPLOYMENTS[stage]: getattr(config, stage).num_replicas or 1 for stage in STAGE_DEPLOYMENTS
             if getattr(config, stage).autoscaling is None}
    started = reported = time.monotonic()
    while True:
        app = serve.status().applications.get(config.app_name)
        status = str(getattr(app.status, "value", app.status)) if app else "NOT_STARTED"
        running = {name: d.replica_states.get("RUNNING", 0) for name, d in (app.deployments if app else {}).items()}
        if status == "RUNNING" and all(running.get(name, 0) == n for name, n in fixed.items()):
            return
        if status == "DEPLOY_FAILED":
            lines = [line for line in (app.message or "").splitlines() if line.strip()]
            raise ValueError(f"the service {config.app_name!r} failed to deploy: {lines[-1] if lines else status}")
        if time.monotonic() - reported > 30:
            reported = time.monotonic()
            print(f"deploying {config.app_name!r}: {status}, running replicas {running} "
                  f"({reported - started:.0f}s)", flush=True)
        time.sleep(0.5)


def deploy(config: ServeConfig) -> str:
    """Deploy or update the application on the connected Ray from its config, as ``serve deploy`` does,
    so that Serve keeps what did not change: an identical config changes nothing, a stage whose replica
    count changes is only scaled, and only a change of the ``args`` (model, limits, batching) rebuilds
    every stage. Refuses replicas a fixed Ray cannot hold; blocks until the application runs; returns
    its URL.
    """
    num_gpus = {stage: resolve_num_gpus(getattr(config, stage).num_gpus) for stage in STAGE_DEPLOYMENTS}
    check_serve_capacity(config, num_gpus)
    weights = resolve_weights(config.model.preset, config.model.weights)  # "default": the shipped file
    if weights and not storage.exists(weights):  # before any replica tries
        raise FileNotFoundError(f"model.weights not found: {config.model.weights}")
    serve.start(http_options=config.http.serve_options())
    client = _get_global_client()
    others = [app for app in _declared_applications(client) if app.get("name") != config.app_name]
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": [*others, application_entry(config, num_gpus)]}))
    _wait_until_running(config)
    host = "127.0.0.1" if config.http.host in ("0.0.0.0", "::") else config.http.host
    return f"http://{host}:{config.http.port}{config.route_prefix.rstrip('/')}/"


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_until_stopped(config: ServeConfig, shutdown_serve: bool) -> None:
    """Block until Ctrl-C or SIGTERM, then delete the application (and stop Serve if ``shutdown_serve``)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print(f"stopping the service {config.app_name!r}", flush=True)
    finally:
        if shutdown_serve:
            serve.shutdown()
        else:
            serve.delete(config.app_name)  # Serve itself stays for the cluster's other applications
