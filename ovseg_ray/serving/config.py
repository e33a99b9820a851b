"""Configuration of the HTTP service: model, limits, region batching and one block per deployment.

The same :class:`ServeConfig` is read by ``ovseg-ray serve --config FILE`` (a YAML of these fields),
by ``jobs/deploy_serve.py`` and, as the application ``args``, by ``serve deploy`` (see
``cluster/serve_config.yaml``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ..config import ConfigError, ModelConfig, StrictModel, format_validation_error, load_config

# Mirrors of ovseg_ray.outputs.OUTPUT_KINDS and ovseg_ray.models.text.MAX_NAME_CHARS, kept here so
# that reading the config does not import torch (the tests check that they stay equal).
OutputKind = Literal["label_png", "overlay_png", "rle"]
MAX_NAME_CHARS = 200

#: ``import_path`` of the application builder, as written in a ``serve deploy`` file.
APP_IMPORT_PATH = "ovseg_ray.serving:app_builder"


class ModelSettings(ModelConfig):
    """The model both stages build, plus the proposal replicas' text-embedding cache."""

    text_cache_size: int = Field(8192, gt=0, description="class-name embeddings kept per proposal replica")


class AutoscalingSettings(StrictModel):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0, description="requests in flight per replica to aim for")
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class DeploymentSettings(StrictModel):
    """Replicas and resources of one deployment (fixed ``num_replicas`` or ``autoscaling``)."""

    num_replicas: int | None = Field(None, ge=1, description="fixed number of replicas (default 1)")
    autoscaling: AutoscalingSettings | None = Field(None, description="autoscale instead of num_replicas")
    max_ongoing_requests: int = Field(16, gt=0, description="requests one replica works on at a time")
    max_queued_requests: int = Field(-1, ge=-1, description="queued requests per caller before 503 (-1: no cap)")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica (fractions allowed)")
    num_gpus: float | Literal["auto"] = Field(
        "auto", description="GPUs per replica (fractions share a GPU); auto = 1 if the cluster has GPUs, else 0"
    )

    @field_validator("num_gpus")
    @classmethod
    def _non_negative(cls, value: float | str) -> float | str:
        if value != "auto" and value < 0:
            raise ValueError("must be >= 0 or 'auto'")
        return value

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> DeploymentSettings:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("give either num_replicas or autoscaling, not both")
        return self


class RegionBatching(StrictModel):
    enabled: bool = Field(True, description="batch regions of concurrent requests into one CLIP forward")
    max_batch_requests: int = Field(16, ge=1, description="requests whose regions share one batch")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a batch waits to fill up")
    max_regions_per_forward: int = Field(512, ge=1, description="cap on regions per encoder call (memory)")


class Limits(StrictModel):
    max_pixels: int = Field(40_000_000, gt=0, description="largest image (width x height) accepted")
    max_request_bytes: int = Field(64 * 2**20, gt=0, description="largest request body (and image file)")
    max_classes: int = Field(1000, gt=0, le=65535, description="most class names per request")
    max_name_chars: int = Field(MAX_NAME_CHARS, gt=0, le=MAX_NAME_CHARS, description="longest class name")
    image_uri_prefixes: list[str] = Field(
        default_factory=list,
        description="where image_uri may point (s3://bucket/prefix, /local/dir); empty (default) = no URIs",
    )


class HTTPSettings(StrictModel):
    host: str = Field("127.0.0.1", description="address the HTTP proxy binds (0.0.0.0 for all interfaces)")
    port: int = Field(8000, ge=1, le=65535)
    request_timeout_s: float | None = Field(None, gt=0, description="proxy timeout per request")

    def serve_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"host": self.host, "port": self.port}
        if self.request_timeout_s is not None:
            options["request_timeout_s"] = self.request_timeout_s
        return options


class ServeConfig(StrictModel):
    app_name: str = Field("ovseg", description="Serve application name")
    route_prefix: str = Field("/", description="URL prefix of the API")
    model: ModelSettings = ModelSettings()
    http: HTTPSettings = HTTPSettings()
    limits: Limits = Limits()
    batching: RegionBatching = RegionBatching()
    default_outputs: list[OutputKind] = Field(
        default_factory=lambda: ["label_png"], description="outputs returned when a request names none"
    )
    ingress: DeploymentSettings = DeploymentSettings(max_ongoing_requests=64, num_gpus=0)
    proposer: DeploymentSettings = DeploymentSettings(max_ongoing_requests=16)
    classifier: DeploymentSettings = DeploymentSettings(max_ongoing_requests=32)

    @field_validator("route_prefix")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @model_validator(mode="after")
    def _batches_can_fill(self) -> ServeConfig:
        if self.batching.enabled and self.classifier.max_ongoing_requests < self.batching.max_batch_requests:
            raise ValueError(
                f"classifier.max_ongoing_requests ({self.classifier.max_ongoing_requests}) is below "
                f"batching.max_batch_requests ({self.batching.max_batch_requests}): batches could never fill"
            )
        return self


def parse_serve_config(data: dict[str, Any], source: str = "serve config") -> ServeConfig:
    """Validate a mapping (e.g. a ``serve deploy`` file's application args), naming bad fields."""
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def is_serve_deploy_file(data: Any) -> bool:
    return isinstance(data, dict) and "applications" in data


def _from_deploy_file(data: dict[str, Any], path: str, app_name: str | None) -> dict[str, Any]:
    """The ServeConfig fields of our application in a ``serve deploy`` file."""
    apps = [a for a in data.get("applications") or [] if isinstance(a, dict)]
    ours = [a for a in apps if a.get("import_path") == APP_IMPORT_PATH]
    if app_name is not None:
        ours = [a for a in ours if a.get("name") == app_name]
    if len(ours) != 1:
        raise ConfigError(
            f"{path}: expected exactly one application with import_path {APP_IMPORT_PATH}"
            + (f" and name {app_name!r}" if app_name else "")
            + f", found {len(ours)}"
        )
    app = ours[0]
    if app.get("deployments"):
        raise ConfigError(
            f"{path}: per-deployment settings under 'deployments' are only applied by `serve deploy`; "
            "put them in args.ingress / args.proposer / args.classifier instead"
        )
    fields = dict(app.get("args") or {})
    if "name" in app:
        fields["app_name"] = app["name"]
    if "route_prefix" in app:
        fields["route_prefix"] = app["route_prefix"]
    http = {k: v for k, v in (data.get("http_options") or {}).items() if k in HTTPSettings.model_fields}
    if http:
        fields["http"] = {**http, **(fields.get("http") or {})}
    return fields


def load_serve_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, app_name: str | None = None
) -> ServeConfig:
    """A ServeConfig from our YAML layout plus dotted overrides, or from a ``serve deploy`` file as it is."""
    if path is None:
        return load_config(ServeConfig, None, overrides)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    if not is_serve_deploy_file(data):
        return load_config(ServeConfig, path, overrides)
    if overrides:
        raise ConfigError(f"flags ({', '.join(sorted(overrides))}) cannot override a serve deploy file; "
                          f"edit its args")
    fields = _from_deploy_file(data, str(path), app_name)
    try:
        return load_config(ServeConfig, None, fields)
    except ConfigError as exc:
        raise ConfigError(f"{path} (application args): {exc}") from None
