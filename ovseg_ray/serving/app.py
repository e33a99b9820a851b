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
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.util import metrics

from .. import __version__
from ..models.ovseg import resolve_weights
from ..outputs import OUTPUT_KINDS
from .api import (
    ErrorResponse,
    RequestError,
    SegmentRequest,
    SegmentResponse,
    load_request_image,
    parse_segment_request,
    read_body,
    response_body,
)
from ..raycluster import resolve_num_gpus, worker_device
from .config import DeploymentSettings, ServeConfig, parse_serve_config
from .stages import ProposalStage, RegionRequest, RegionResult, RegionStage, SegmentOutput, load_segmenter

logger = logging.getLogger("ray.serve")

INGRESS, PROPOSER, CLASSIFIER = "OVSegIngress", "MaskProposer", "RegionClassifier"

api = FastAPI(
    title="OVSeg open-vocabulary segmentation",
    version=__version__,
    description="Segment an image into any list of class names (OVSeg: MaskFormer proposals + mask-adapted CLIP).",
)

_FORM_SCHEMA = {
    "type": "object",
    "required": ["image", "classes"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "the image file (PNG, JPEG, WebP, ...)"},
        "classes": {"type": "string", "description": "comma-separated names, a JSON list, or the field repeated"},
        "lambda": {"type": "number", "minimum": 0, "maximum": 1},
        "mask_threshold": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "outputs": {"type": "string", "description": "comma-separated: label_png, overlay_png, rle"},
        "mode": {"type": "string", "enum": ["eval", "demo"]},
    },
}
_SEGMENT_DOCS = {
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": _FORM_SCHEMA},
                "application/json": {"schema": SegmentRequest.model_json_schema(by_alias=True)},
            },
        }
    },
    "responses": {
        200: {"model": SegmentResponse, "description": "the segmentation"},
        400: {"model": ErrorResponse, "description": "unreadable image or body"},
        403: {"model": ErrorResponse, "description": "image_uri outside the allowed prefixes"},
        413: {"model": ErrorResponse, "description": "body or image over the configured limits"},
        415: {"model": ErrorResponse, "description": "neither multipart/form-data nor JSON"},
        422: {"model": ErrorResponse, "description": "bad classes or parameters"},
        503: {"model": ErrorResponse, "description": "overloaded: retry later"},
    },
}


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
        settings = ServeConfig.model_validate(config)
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
        settings = ServeConfig.model_validate(config)
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

        self.config = ServeConfig.model_validate(config)
        self.proposer = proposer
        self.preset = load_preset(self.config.model.preset)
        self.defaults = {
            "lambda": self.preset.ensemble_lambda,
            "mask_threshold": self.preset.mask_threshold,
            "outputs": list(self.config.default_outputs),
        }
        self.status_counts: Counter[int] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self._requests = metrics.Counter(
            "ovseg_segment_requests", description="POST /v1/segment by HTTP status", tag_keys=("status",)
        )
        self._latency = metrics.Histogram(
            "ovseg_segment_latency_s", description="POST /v1/segment latency (successful requests)",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30],
        )

    def _reply(self, status: int, body: dict) -> JSONResponse:
        self.status_counts[status] += 1
        self._requests.inc(tags={"status": str(status)})
        return JSONResponse(body, status_code=status)

    @api.post("/v1/segment", summary="Segment an image into the given classes", **_SEGMENT_DOCS)
    async def segment(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        limits = self.config.limits
        try:
            body = await read_body(request.stream(), request.headers.get("content-length"), limits.max_request_bytes)
            content_type = request.headers.get("content-type", "")
            parsed = await asyncio.to_thread(parse_segment_request, body, content_type, limits, self.defaults)
            del body
            image = await asyncio.to_thread(load_request_image, parsed, limits)
        except RequestError as exc:
            return self._reply(exc.status, {"detail": exc.message})
        decode_s = time.perf_counter() - start
        try:
            output = await self.proposer.segment.remote(image, parsed.classes, parsed.lam, parsed.mask_threshold,
                                                        parsed.mode)
        except BackPressureError as exc:
            return self._reply(503, {"detail": f"the service is overloaded, retry later ({exc})"})
        except (RayActorError, ActorUnavailableError) as exc:
            logger.warning("model replica unavailable: %s", exc)
            return self._reply(503, {"detail": "a model replica is unavailable (restarting?), retry later"})
        except Exception as exc:  # a bug or a failed replica: answer in JSON, keep the service up
            logger.exception("segmentation failed")
            return self._reply(500, {"detail": f"internal error while segmenting ({type(exc).__name__})"})
        encode_start = time.perf_counter()
        result = await asyncio.to_thread(response_body, image, parsed, output, {"decode_s": decode_s})
        result["timings"]["outputs_s"] = round(time.perf_counter() - encode_start, 6)
        result["timings"]["total_s"] = round(time.perf_counter() - start, 6)
        if output.region_batch_requests:
            self.batch_sizes[output.region_batch_requests] += 1
        self._latency.observe(time.perf_counter() - start)
        return self._reply(200, result)

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


def deployment_options(settings: DeploymentSettings) -> dict[str, Any]:
    """Keyword arguments for ``Deployment.options``; ``num_gpus: auto`` is resolved on the cluster."""
    options: dict[str, Any] = {
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": resolve_num_gpus(settings.num_gpus)},
    }
    if settings.autoscaling is not None:
        options["autoscaling_config"] = settings.autoscaling.model_dump(exclude_none=True)
    else:
        options["num_replicas"] = settings.num_replicas or 1
    return options


def build_app(config: ServeConfig) -> serve.Application:
    """The bound application; per-deployment options come from ``config`` (``num_gpus: auto`` resolved now)."""
    settings = config.model_dump(mode="json", by_alias=True)
    classifier = RegionClassifier.options(**deployment_options(config.classifier)).bind(settings)
    proposer = MaskProposer.options(**deployment_options(config.proposer)).bind(classifier, settings)
    return OVSegIngress.options(**deployment_options(config.ingress)).bind(proposer, settings)


def app_builder(args: dict) -> serve.Application:
    """Entry point of ``serve deploy`` / ``serve run ovseg_ray.serving:app_builder``: args = ServeConfig fields."""
    return build_app(parse_serve_config(dict(args or {}), "application args"))


def deploy(config: ServeConfig) -> str:
    """Start Serve's HTTP proxy and deploy the application on the connected Ray; returns its URL.

    Blocks until every replica is running (raises if the deployment fails).
    """
    serve.start(http_options=config.http.serve_options())
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=False)
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
