"""YAML configs with command-line overrides; errors name the bad field."""

from __future__ import annotations

import argparse

import pytest
from pydantic import Field

from ovseg_ray.config import ConfigError, StrictModel, add_config_arguments, config_from_args, load_config


class Pool(StrictModel):
    min_size: int = Field(1, ge=1, description="smallest pool")
    max_size: int = 2
    num_gpus: float | str = "auto"


class Job(StrictModel):
    input: str
    classes: list[str] = []
    pool: Pool = Pool()


def test_yaml_plus_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: s3://bucket/data\npool:\n  min_size: 2\n  max_size: 4\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Job)
    args = parser.parse_args(["--config", str(path), "--pool.max-size", "8", "--classes", "sky, grass"])
    job = config_from_args(args, Job)
    assert job.input == "s3://bucket/data"
    assert job.pool.min_size == 2 and job.pool.max_size == 8
    assert job.classes == ["sky", "grass"]


def test_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"pool\.min_size: Input should be greater than or equal to 1"):
        load_config(Job, overrides={"input": "x", "pool.min_size": 0})
    with pytest.raises(ConfigError, match=r"pool\.size: Extra inputs are not permitted"):
        load_config(Job, overrides={"input": "x", "pool.size": 3})
    with pytest.raises(ConfigError, match=r"input: Field required"):
        load_config(Job)
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Job, bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Job, tmp_path / "missing.yaml")


def test_a_single_value_for_a_list_field_is_a_list_of_one():
    from ovseg_ray.config import _parse_value

    assert _parse_value("64", as_list=True) == [64]
    assert _parse_value("64,96", as_list=True) == ["64", "96"]  # pydantic turns them into the field's type
    assert _parse_value("[64, 96]", as_list=True) == [64, 96]
    assert _parse_value("64", as_list=False) == 64
