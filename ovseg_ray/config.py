"""Pydantic configuration: YAML files, dotted command-line overrides, errors that name the field."""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the field."""


PRESET_DIR = Path(__file__).parent / "models" / "presets"


def preset_names() -> list[str]:
    """Names of the shipped model presets (``ovseg_ray/models/presets/*.json``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def check_model_preset(value: str) -> str:
    """A preset name, or a model config JSON (path or s3://) such as a training run's model_config.json."""
    if value in preset_names() or value.endswith(".json"):
        return value
    raise ValueError(f"unknown model preset {value!r}; choose one of {', '.join(preset_names())} "
                     f"or give a model config .json")


# A config field naming a model: checked when the config is read, long before a model is built.
ModelPreset = Annotated[str, AfterValidator(check_model_preset)]


#: Autocast of the networks at inference (resolved by ``ovseg_ray.device.autocast_dtype``).
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISION_HELP = ("autocast of the networks: auto = bf16 on a GPU that supports it, fp32 on CPU (logits, "
                  "ensemble and fusion always fp32)")


class StrictModel(BaseModel):
    """Base for every config: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(StrictModel):
    """Which model an inference engine (batch inference, evaluation, serving) builds."""

    preset: ModelPreset = Field("tiny", description="model preset (tiny, r101c-vitb16, swinb-vitl14) or a "
                                                   "model config .json")
    weights: str | None = Field("default", description="checkpoint path or s3:// URI (our layout or an OVSeg "
                                "release); default = the preset's shipped weights (tiny ships trained ones; "
                                "the others none), none = seeded random weights")
    device: str = Field("auto", description="auto (the GPU Ray gave the actor/replica, else CPU), cpu, cuda "
                                            "or cuda:N")
    seed: int = Field(0, description="seed of the random initialisation (presets without weights)")
    precision: Precision = Field("auto", description=PRECISION_HELP)
    max_regions_per_forward: int = Field(512, gt=0, description="most regions in one masked-CLIP forward")
    skip_min_area: int = Field(0, ge=0, description="proposals whose binary mask has fewer pixels (processing "
                               "size) get no CLIP region, like empty ones; 0 = off")
    skip_no_object_above: float | None = Field(
        None, gt=0, le=1, description="proposals whose MaskFormer no-object probability is above this get no "
                                      "CLIP region, like empty ones; none = off")

    def segmenter_options(self) -> dict[str, Any]:
        """The :class:`ovseg_ray.inference.Segmenter` keyword arguments these settings give."""
        return {"precision": self.precision, "max_regions_per_forward": self.max_regions_per_forward,
                "skip_min_area": self.skip_min_area, "skip_no_object_above": self.skip_no_object_above}


class ActorPoolConfig(StrictModel):
    """A Ray Data actor pool: its size range (autoscaled in between), batch and GPUs per actor.

    Subclasses add ``num_cpus`` with the bounds that suit their work.
    """

    min_actors: int = Field(1, ge=1, description="smallest actor pool size")
    max_actors: int = Field(1, ge=1, description="largest actor pool size (Ray Data autoscales in between)")
    batch_size: int = Field(4, ge=1, description="images handed to an actor per call")
    num_gpus: float | Literal["auto"] = Field(
        "auto", description="GPUs per actor: a number (fractions share a GPU) or auto (1 if the cluster has GPUs)")

    @model_validator(mode="after")
    def _pool_bounds(self) -> ActorPoolConfig:
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})")
        return self


def settings_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for each setting that differs, nested dicts compared key by key (dotted)."""
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += settings_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return found


def format_validation_error(error: ValidationError, source: str = "config") -> str:
    lines = [f"invalid {source}:"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(root)"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {field}: {item['msg']}{shown}")
    return "\n".join(lines)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def load_config(model: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                context: dict[str, Any] | None = None) -> T:
    """Build ``model`` from a YAML file (optional) plus ``{"a.b": value}`` overrides (``context``: for
    the model's validators)."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = f"config {path}"
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of fields, got {type(loaded).__name__}")
        data = loaded or {}
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any, str]]:
    fields = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        dotted = f"{prefix}{name}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields.extend(_leaf_fields(annotation, dotted + "."))
        else:
            fields.append((dotted, annotation, info.description or ""))
    return fields


def _is_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_list(arg) for arg in typing.get_args(annotation) if arg is not type(None))
    return origin in (list, tuple)


def add_config_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """``--config FILE`` plus one ``--field.sub-field VALUE`` flag per leaf field of ``model``.

    Values are parsed as YAML scalars (``--batch-size 8``, ``--use-gpu true``); list fields take a
    comma-separated list or a YAML list.
    """
    parser.add_argument("--config", help="YAML file with the fields below (flags override it)")
    group = parser.add_argument_group("config fields (override the YAML)")
    for dotted, annotation, description in _leaf_fields(model):
        flag = "--" + dotted.replace("_", "-")
        group.add_argument(flag, dest=f"cfg:{dotted}", default=None, metavar="VALUE",
                           help=description or None)
        if _is_list(annotation):
            parser.set_defaults(**{f"list:{dotted}": True})


def _parse_value(raw: str, as_list: bool) -> Any:
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if as_list and isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    elif as_list and value is not None and not isinstance(value, list):
        value = [value]  # one number or flag for a list field: a list of one
    return value


def dotted_values(model: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": "8"}`` with each text value parsed as the flag ``--a.b 8`` would be (a YAML scalar; a
    comma-separated list for list fields); other values pass unchanged."""
    lists = {dotted for dotted, annotation, _ in _leaf_fields(model) if _is_list(annotation)}
    return {key: _parse_value(value, key in lists) if isinstance(value, str) else value for key, value in values.items()}


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given as flags (see :func:`add_config_arguments`), as dotted overrides."""
    overrides = {}
    for key, raw in vars(args).items():
        if key.startswith("cfg:") and raw is not None:
            dotted = key[4:]
            overrides[dotted] = _parse_value(raw, bool(getattr(args, f"list:{dotted}", False)))
    return overrides


def config_from_args(args: argparse.Namespace, model: type[T]) -> T:
    return load_config(model, getattr(args, "config", None), overrides_from_args(args))
