"""A Ray head started by a test, as a cluster user starts one (``ray start --head``), and stopped by it.

Every port is a free one (never Ray's defaults: other Rays run on this machine), the temp dir is the
test's own, and ``ray start --block`` keeps the head's processes under one process group that the
test ends itself: never ``ray stop``, which would stop every Ray of this user on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class RayHead:
    process: subprocess.Popen
    temp_dir: str
    dashboard: str  # http://127.0.0.1:PORT, for `ray job submit` and `serve deploy`
    gcs: str  # 127.0.0.1:PORT, for RAY_ADDRESS
    env: dict[str, str]  # the environment the head was started with (the "node's")
    log: Path

    def run(self, *args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """A Ray CLI command (``ray``, ``serve``) from the venv against this head."""
        command = [str(VENV_BIN / args[0]), *args[1:]]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**self.env, "RAY_ADDRESS": self.dashboard, **(env or {})})

    def stop(self) -> None:
        """End the head's processes: ``ray start --block`` stops them when it gets SIGTERM; what is left
        after 5 s (after a Serve deployment its graceful stop took 30 s) is killed with the group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever of the head's process group is left
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


STARTUP_PRIORITY = -15  # the raylet gives the dashboard agent 15 s (hard-coded) to write its port files


def _start_up_first() -> None:
    """A head starting on a machine loaded by other test runs: ahead of them until it runs (where
    allowed, i.e. as root), then back to normal priority (:func:`_renice_group`)."""
    try:
        os.nice(STARTUP_PRIORITY)
    except OSError:
        pass


def _renice_group(pgid: int, priority: int) -> None:
    try:
        os.setpriority(os.PRIO_PGRP, pgid, priority)
    except OSError:
        pass


def start_head(env: dict[str, str], num_cpus: int = 2, timeout: float = 420) -> RayHead:
    """``ray start --head --block`` with ``env`` as the node's environment; returns once jobs can be submitted."""
    gcs, dashboard, client, node_manager, object_manager, metrics, agent_grpc, agent_http, runtime_env = free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="ovr-head-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    log = Path(temp_dir) / "ray-start.log"
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", str(num_cpus), "--num-gpus", "0",
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--ray-client-server-port", str(client), "--node-manager-port", str(node_manager),
        "--object-manager-port", str(object_manager), "--metrics-export-port", str(metrics),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--dashboard-agent-listen-port", str(agent_http),
        "--runtime-env-agent-port", str(runtime_env), "--object-store-memory", str(300 * 2**20),
        "--temp-dir", temp_dir,
    ]
    env = {**env, "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', os.defpath)}",  # the job's `python` is the venv's
           # Ray's 60 s for the dashboard and its agents' registration are too short on a loaded 2-core machine
           "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300", "RAY_agent_register_timeout_ms": "300000"}
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_start_up_first)
    head = RayHead(process, temp_dir, f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", env, log)
    deadline = time.time() + timeout
    while True:  # the dashboard answers before the raylet has registered: wait for both
        try:
            with urllib.request.urlopen(f"{head.dashboard}/api/version", timeout=5) as response:
                json.loads(response.read())
            if "Ray runtime started" in log.read_text():
                _renice_group(process.pid, 0)
                return head
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            head.stop()
            raise RuntimeError(f"the Ray head did not start:\n{log.read_text()[-3000:]}") from None
        time.sleep(1)


def start_head_retrying(env: dict[str, str], num_cpus: int = 2, attempts: int = 3) -> RayHead:
    """:func:`start_head`, again when it fails: ``ray start`` gives a raylet only 30 s (not configurable)
    to register, which a machine loaded by other test runs can miss."""
    for attempt in range(attempts):
        try:
            return start_head(env, num_cpus)
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
