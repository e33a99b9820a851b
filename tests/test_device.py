"""Resource requests: never hang a fixed cluster, let a growing (autoscaling) cluster add nodes."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from PIL import Image

from ovseg_ray.evaluation.batch_segment import SegmentTask
from ovseg_ray.device import is_device_failure, resolve_device
from ovseg_ray.raycluster import check_capacity, cluster_can_grow, resolve_num_gpus, worker_device


def test_fixed_local_cluster_refuses_what_it_cannot_hold(ray_session):
    assert not cluster_can_grow()  # the test session's Ray was started by this process
    assert resolve_num_gpus("auto") == 0.0 and resolve_num_gpus(0) == 0.0
    with pytest.raises(ValueError, match="num_gpus=1.0 requested but the Ray cluster has no GPUs"):
        resolve_num_gpus(1)
    with pytest.raises(ValueError, match=r"pools need 3 CPUs \(the cluster has 2\) to start: lower it"):
        check_capacity(3, 0, "pools", "lower it")
    check_capacity(2, 0, "pools", "lower it")  # fits exactly


def test_joined_cluster_may_grow_so_requests_only_warn(ray_session, monkeypatch, caplog):
    import ray

    monkeypatch.setattr(ray._private.worker._global_node, "head", False)  # as after ray.init(address=...)
    assert cluster_can_grow()
    with caplog.at_level(logging.WARNING, logger="ovseg_ray.raycluster"):
        assert resolve_num_gpus(0.5) == 0.5
        check_capacity(16, 4, "pools", "lower it")
    assert "waiting for its autoscaler to add GPU nodes" in caplog.text
    assert "pools need 16 CPUs (the cluster has 2) and 4 GPUs (the cluster has 0) to start" in caplog.text


def test_device_names():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="unknown device 'tpu9'"):
        resolve_device("tpu9")


def test_device_failures_fail_the_task_while_bad_images_are_recorded(tmp_path):
    assert is_device_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_device_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_device_failure(RuntimeError("shape '[3, 4]' is invalid for input of size 7"))
    assert not is_device_failure(ValueError("CUDA"))

    class FailingSegmenter:
        def __init__(self, exc):
            self.exc = exc

        def segment(self, *args, **kwargs):
            raise self.exc

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    row = {"image_uri": "a.png", "stem": "a", "image_uri_error": "", "image_uri_bytes": buf.getvalue()}
    task = SegmentTask(out=str(tmp_path), classes=["cat", "dog"], lam=None, mask_threshold=None)
    [recorded] = task.process(FailingSegmenter(RuntimeError("size mismatch")), row)
    assert recorded["status"] == "error" and "size mismatch" in recorded["reason"]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        task.process(FailingSegmenter(torch.cuda.OutOfMemoryError("CUDA out of memory")), row)


def test_worker_device_follows_what_ray_granted(ray_session):
    import ray

    @ray.remote(num_gpus=0, num_cpus=0.1)
    def device_in_a_task(name):
        return str(worker_device(name))

    assert ray.get(device_in_a_task.remote("auto")) == "cpu"  # no GPU granted: CPU, whatever the node has
    assert ray.get(device_in_a_task.remote("cpu")) == "cpu"
    with pytest.raises(ValueError, match="unknown device 'tpu9'"):
        worker_device("tpu9")
