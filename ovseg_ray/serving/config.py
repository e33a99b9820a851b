"""Configuration of the HTTP service: model, limits, region batching and one block per deployment.

The same :class:`ServeConfig` is read by ``ovseg-ray serve --config FILE`` (a YAML of these fields,
or a ``serve deploy`` file), by ``jobs/deploy_serve.py`` and by ``serve deploy`` /
``serve run ovseg_ray.serving:app_builder``. In a ``serve deploy`` file (``cluster/serve_config.yaml``)
the application's ``args`` hold what every replica reads (:data:`APP_ARGS`) and its ``deployments``
hold each stage's replicas and resources: Serve then updates a stage whose settings change without
touching the others (a change of ``args`` rebuilds the whole application). :func:`application_entry`
writes that form; :func:`load_serve_config` reads it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from ..config import ConfigError, ModelConfig, StrictModel, dotted_values, format_validation_error, load_config

# Mirrors of ovseg_ray.outputs.OUTPUT_KINDS and ovseg_ray.models.text.MAX_NAME_CHARS, kept here so
# that reading the config does not import torch (the tests check that they stay equal).
OutputKind = Literal["label_png", "overlay_png", "rle"]
MAX_NAME_CHARS = 200

#: ``import_path`` of the application builder, as written in a ``serve deploy`` file.
APP_IMPORT_PATH = "ovseg_ray.serving:app_builder"
#: The Serve deployment of each stage block (``ingress``, ``proposer``, ``classifier``).
STAGE_DEPLOYMENTS = {"ingress": "OVSegIngress", "proposer": "MaskProposer", "classifier": "RegionClassifier"}
#: The ServeConfig fields every replica reads: a serve deploy file's application ``args``.
APP_ARGS = ("model", "limits", "batching", "default_outputs")
#: How a stage block's fields are written in a deployment entry of a serve deploy file.
_ENTRY_FIELDS = {"num_replicas": "num_replicas", "autoscaling": "autoscaling_config",
                 "max_ongoing_requests": "max_ongoing_requests", "max_queued_requests": "max_queued_requests"}
_ACTOR_FIELDS = ("num_cpus", "num_gpus")


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

    def replicas_to_start(self, stage: str) -> int:
        """Replicas Serve starts for ``stage`` (before any autoscaling)."""
        settings: DeploymentSettings = getattr(self, stage)
        if settings.autoscaling is None:
            return settings.num_replicas or 1
        scaling = settings.autoscaling
        return scaling.min_replicas if scaling.initial_replicas is None else scaling.initial_replicas

    @model_validator(mode="after")
    def _batches_can_fill(self, info: ValidationInfo) -> ServeConfig:
        if (info.context or {}).get("stages_elsewhere"):  # the deploy file's `deployments` hold them
            return self
        if self.batching.enabled and self.classifier.max_ongoing_requests < self.batching.max_batch_requests:
            raise ValueError(
                f"classifier.max_ongoing_requests ({self.classifier.max_ongoing_requests}) is below "
                f"batching.max_batch_requests ({self.batching.max_batch_requests}): batches could never fill"
            )
        return self


def parse_serve_config(data: dict[str, Any], source: str = "serve config", stages_elsewhere: bool = False
                       ) -> ServeConfig:
    """Validate a mapping, naming bad fields. ``stages_elsewhere``: the mapping is a serve deploy file's
    application ``args``, whose stages' settings Serve takes from the file's ``deployments``."""
    try:
        return ServeConfig.model_validate(data, context={"stages_elsewhere": stages_elsewhere})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def config_from_app_args(args: dict[str, Any]) -> ServeConfig:
    """The ServeConfig of an application builder's ``args``: nested fields (a deploy file's ``args``) or
    dotted ones from ``serve run ... FIELD=VALUE`` (``limits.max-classes=200``, values parsed like
    ``ovseg-ray serve`` flags), nested ones first."""
    values = {key.replace("-", "_"): value for key, value in sorted((args or {}).items(), key=lambda kv: "." in kv[0])}
    try:
        return load_config(ServeConfig, None, dotted_values(ServeConfig, values), context={"stages_elsewhere": True})
    except ConfigError as exc:
        raise ConfigError(f"application args: {exc}") from None


def deployment_entry(stage: str, settings: DeploymentSettings, num_gpus: float) -> dict[str, Any]:
    """A stage's deployment in serve deploy form (also its ``Deployment.options``, less ``name``)."""
    entry: dict[str, Any] = {"name": STAGE_DEPLOYMENTS[stage]}
    if settings.autoscaling is not None:
        entry["autoscaling_config"] = settings.autoscaling.model_dump(exclude_none=True)
    else:
        entry["num_replicas"] = settings.num_replicas or 1
    entry["max_ongoing_requests"] = settings.max_ongoing_requests
    entry["max_queued_requests"] = settings.max_queued_requests
    entry["ray_actor_options"] = {"num_cpus": settings.num_cpus, "num_gpus": num_gpus}
    return entry


def application_entry(config: ServeConfig, num_gpus: dict[str, float]) -> dict[str, Any]:
    """Our application in serve deploy form: ``args`` for every replica, one ``deployments`` entry per
    stage (``num_gpus``: each stage's GPUs per replica, ``auto`` already resolved)."""
    return {
        "name": config.app_name,
        "route_prefix": config.route_prefix,
        "import_path": APP_IMPORT_PATH,
        "args": config.model_dump(mode="json", by_alias=True, include=set(APP_ARGS)),
        "deployments": [deployment_entry(stage, getattr(config, stage), num_gpus[stage]) for stage in STAGE_DEPLOYMENTS],
    }


def _stage_fields(entry: dict[str, Any], path: str) -> tuple[str, dict[str, Any]]:
    """The stage block written as ``entry`` (a deployment of a serve deploy file)."""
    stage = next((s for s, name in STAGE_DEPLOYMENTS.items() if name == entry.get("name")), None)
    if stage is None:
        raise ConfigError(f"{path}: deployments: unknown deployment {entry.get('name')!r}; "
                          f"expected {', '.join(STAGE_DEPLOYMENTS.values())}")
    where = f"{path}: deployments: {entry['name']}"
    unknown = sorted(set(entry) - {"name", "ray_actor_options", *_ENTRY_FIELDS.values()})
    actor = entry.get("ray_actor_options") or {}
    unknown += [f"ray_actor_options.{key}" for key in sorted(set(actor) - set(_ACTOR_FIELDS))]
    if unknown:
        raise ConfigError(f"{where}: {', '.join(unknown)} not understood here (known: "
                          f"{', '.join([*_ENTRY_FIELDS.values(), *(f'ray_actor_options.{k}' for k in _ACTOR_FIELDS)])})")
    fields = {ours: entry[theirs] for ours, theirs in _ENTRY_FIELDS.items() if theirs in entry}
    return stage, {**fields, **{key: actor[key] for key in _ACTOR_FIELDS if key in actor}}


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
    fields = dict(app.get("args") or {})
    for entry in app.get("deployments") or []:
        stage, settings = _stage_fields(entry if isinstance(entry, dict) else {}, path)
        if stage in fields:
            raise ConfigError(f"{path}: the {stage} stage is set twice, in args.{stage} and in deployments")
        fields[stage] = settings
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
