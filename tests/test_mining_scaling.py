"""The actor pools' scaling settings reach Ray Data, and a remote checkpoint is read once per node
(issue 16, item 8). The multi-node demonstration is benchmarks/mining_autoscale.py."""

from __future__ import annotations

import pytest

from ovseg_ray.config import ConfigError, load_config
from ovseg_ray.data import storage
from ovseg_ray.mining.config import MiningConfig
from ovseg_ray.mining.stages import node_local_weights


def test_pool_scaling_settings_reach_ray_data(tmp_path):
    from ovseg_ray.mining.pipeline import PoolPlan

    config = load_config(MiningConfig, overrides={
        "images": "i", "captions": "c.json", "output": "o",
        "proposals.min_actors": 1, "proposals.max_actors": 3, "proposals.initial_actors": 2,
        "proposals.max_tasks_in_flight_per_actor": 4, "autoscaling.upscaling_threshold": 1.0,
        "autoscaling.max_upscaling_delta": 1})
    stage = config.proposals
    strategy = PoolPlan("ProposalStage", stage.min_actors, stage.max_actors, 0.5, 0.0, 2, stage.initial_actors,
                        stage.max_tasks_in_flight_per_actor).strategy()
    assert (strategy.min_size, strategy.max_size, strategy.initial_size) == (1, 3, 2)
    assert strategy.max_tasks_in_flight_per_actor == 4
    assert config.autoscaling.ray_data_settings() == {"actor_pool_util_upscaling_threshold": 1.0,
                                                      "actor_pool_max_upscaling_delta": 1}
    with pytest.raises(ConfigError, match=r"proposals: Value error, initial_actors \(5\) must be within"):
        load_config(MiningConfig, overrides={"images": "i", "captions": "c.json", "output": "o",
                                             "proposals.max_actors": 3, "proposals.initial_actors": 5})


def test_a_remote_checkpoint_is_downloaded_once_per_node(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("OVSEG_RAY_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/weights/model.safetensors"
    storage.write_bytes(uri, b"weights v1")
    first = node_local_weights(uri)
    assert first.startswith(str(tmp_path / "cache" / "weights")) and first.endswith("model.safetensors")
    assert open(first, "rb").read() == b"weights v1"
    storage.remove_files([uri])  # a second actor on the node never goes back to the store
    assert node_local_weights(uri) == first
    assert node_local_weights("/local/model.safetensors") == "/local/model.safetensors"
    assert node_local_weights(None) is None
