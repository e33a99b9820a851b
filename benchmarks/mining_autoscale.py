"""Autoscaling mining on a multi-node cluster made of Ray's fake nodes (issue 16, item 8 / acceptance 3).

    python benchmarks/mining_autoscale.py [--images 24] [--workers 3] [--idle-minutes 0.2]

1. A single-node reference: the synthetic COCO dataset mined on a local Ray (a child process).
2. An autoscaling cluster started here with Ray's fake multi-node provider and this script's own
   config: a head with 0 CPUs (so every task and actor needs a worker node), one worker type of
   1 CPU, 0..``--workers`` of them; non-default ports, its own temp dir, every address 127.0.0.1.
3. The same mining job on that cluster, with the proposal pool allowed to grow (1 -> ``--max-actors``
   actors, Ray Data's upscaling threshold lowered, more batches queued per actor) while a thread
   prints the node/actor timeline (a line per change: alive worker nodes, each pool's alive and
   starting actors).
4. Then the nodes go idle and the autoscaler removes them; the script waits for that, compares the
   pairs with the reference, prints a verdict line, and stops the processes it started (found by
   its temp dir; never ``ray stop``, which would stop other people's Rays on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
POOL_NAMES = ("ProposalStage", "MatchingStage")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mining_config(data: Path, output: Path, max_actors: int) -> dict:
    return {
        "images": str(data / "images"), "captions": str(data / "annotations" / "captions.json"),
        "output": str(output), "shard_size": 4, "load_num_cpus": 0.25,
        # Ray's fake nodes cannot declare memory (its provider refuses the resource), so a memory
        # reservation would make the autoscaler call the loading tasks infeasible and add no node for them.
        "load_memory_mb": 0,
        "proposals": {"batch_size": 1, "min_actors": 1, "max_actors": max_actors, "num_cpus": 0.5,
                      "max_tasks_in_flight_per_actor": 4},
        "matching": {"batch_size": 2, "min_actors": 1, "max_actors": 2, "num_cpus": 0.5},
        "autoscaling": {"upscaling_threshold": 1.0, "max_upscaling_delta": 1},
    }


def reference_child(config: dict) -> None:
    """The single-node run: a local Ray in this (child) process."""
    import ray

    from ovseg_ray.mining.config import MiningConfig
    from ovseg_ray.mining.pipeline import mine_pairs
    from ovseg_ray.raycluster import init_ray

    for attempt in range(3):  # Ray's 30 s start-up wait can run out on a loaded machine
        try:
            init_ray(num_cpus=2, object_store_memory=256 * 2**20)
            break
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            ray.shutdown()
    print(mine_pairs(MiningConfig.model_validate(config)).summary_line(), flush=True)


def cluster_config(workers: int, idle_minutes: float, gcs_address: str) -> dict:
    """The autoscaler config of the fake cluster (the wheel ships no example to start from)."""
    return {
        "cluster_name": "ovseg-mining-autoscale", "max_workers": workers, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_launch_config_check": True,
                     "disable_node_updaters": True, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ray"}, "docker": {},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": 1, "object_store_memory": 150 * 2**20}, "node_config": {},
                           "min_workers": 0, "max_workers": workers},
        },
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


def start_head(port: int, temp_dir: Path, config_file: Path, env: dict) -> None:
    """``ray start --head`` with 0 CPUs, the autoscaler config, non-default ports and our temp dir."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    started = subprocess.run([ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=0",
                    "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                    f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-port={free_port()}",
                    f"--temp-dir={temp_dir}",
                    "--object-store-memory=150000000", f"--autoscaling-config={config_file}",
                    "--disable-usage-stats"], env=env, check=False, capture_output=True, text=True)
    if started.returncode != 0:
        raise RuntimeError(f"ray start --head failed:\n{started.stderr[-3000:]}")


def own_processes(temp_dir: Path) -> list[int]:
    """The processes of this script's cluster: those whose command line names its temp dir."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(temp_dir) in cmdline:
                pids.append(int(entry.name))
    return pids


def stop_own_processes(temp_dir: Path) -> int:
    """SIGTERM, then SIGKILL after 15 s, to this cluster's processes only (never ``ray stop``)."""
    pids = own_processes(temp_dir)
    found = len(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while sig == signal.SIGTERM and own_processes(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        pids = own_processes(temp_dir)
    return found


class Timeline:
    """Samples the cluster once a second; prints a line whenever the picture changes."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.rows: list[tuple[float, int, dict[str, tuple[int, int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def snapshot(self) -> tuple[int, dict[str, tuple[int, int]]]:
        import ray
        import ray._private.state

        workers = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
        pools = {}
        actors = ray._private.state.actors().values()
        for name in POOL_NAMES:
            states = [a["State"] for a in actors if a["ActorClassName"] == f"MapWorker(MapBatches({name}))"]
            pools[name] = (states.count("ALIVE"), sum(s in ("PENDING_CREATION", "DEPENDENCIES_UNREADY", "RESTARTING")
                                                      for s in states))
        return workers, pools

    def sample(self) -> None:
        workers, pools = self.snapshot()
        if not self.rows or self.rows[-1][1:] != (workers, pools):
            elapsed = time.monotonic() - self.start
            self.rows.append((elapsed, workers, pools))
            text = ", ".join(f"{name} {alive} alive + {starting} starting" for name, (alive, starting) in pools.items())
            print(f"[{elapsed:6.1f}s] worker nodes {workers}; {text}", flush=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.sample()
            except Exception as exc:  # a sample lost while nodes come and go is not fatal
                print(f"[timeline] sample failed: {exc}", flush=True)

    def __enter__(self) -> Timeline:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def max_alive(self, pool: str) -> int:
        return max((pools[pool][0] for _, _, pools in self.rows), default=0)

    def max_workers(self) -> int:
        return max((workers for _, workers, _ in self.rows), default=0)


def pair_rows(output: Path) -> list[dict]:
    from ovseg_ray.data.pair_store import OutputLayout

    rows = OutputLayout(str(output)).read_table("pairs").to_pylist()
    return sorted(rows, key=lambda r: (r["image_id"], r["noun"], r["proposal_index"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--workers", type=int, default=3, help="most worker nodes (1 CPU each)")
    parser.add_argument("--max-actors", type=int, default=3, help="most proposal actors")
    parser.add_argument("--idle-minutes", type=float, default=0.2, help="idle time before a node is removed")
    parser.add_argument("--removal-timeout", type=float, default=180.0)
    parser.add_argument("--head-attempts", type=int, default=3, help="tries at starting the head")
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference:
        reference_child(json.loads(args.reference))
        return 0

    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled",
           "NLTK_DATA": os.environ.get("NLTK_DATA", str(REPO.parent / "shared" / "nltk_data"))}
    os.environ.update({k: env[k] for k in ("PYTHONPATH", "RAY_AUTH_MODE", "NLTK_DATA")})
    sys.path.insert(0, str(REPO))
    from ovseg_ray.data.synth import generate_dataset

    work = Path(tempfile.mkdtemp(prefix="ovas-", dir="/tmp"))  # short: Ray's socket paths must stay short
    data = work / "coco"
    generate_dataset(str(data), images=args.images, seed=3, eval_images=1)

    started = time.monotonic()
    # The single-node reference runs alongside the cluster (the two compete for the same cores).
    reference = subprocess.Popen([sys.executable, __file__, "--reference",
                                  json.dumps(mining_config(data, work / "reference", 1))],
                                 env=env, cwd=REPO, stdout=(work / "reference.out").open("w"),
                                 stderr=(work / "reference.err").open("w"))

    temp_dir = work / "ray"
    config_file = work / "cluster.yaml"
    gcs_port_probe = free_port()
    head_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # 0: every node's address is 127.0.0.1
    verdict = 1
    try:
        # The provider needs the GCS address before the head exists: write the config for a chosen
        # port, then start the head on it.
        address = f"127.0.0.1:{gcs_port_probe}"
        config_file.write_text(yaml.safe_dump(cluster_config(args.workers, args.idle_minutes, address)))
        for attempt in range(args.head_attempts):  # Ray's 30 s start-up wait can run out on a loaded machine
            try:
                start_head(gcs_port_probe, temp_dir, config_file, head_env)
                break
            except RuntimeError as exc:
                print(f"head start {attempt + 1} failed ({str(exc).splitlines()[-1]}); trying again", flush=True)
                stop_own_processes(temp_dir)
        else:
            raise RuntimeError(f"the head did not start in {args.head_attempts} attempts")
        print(f"fake autoscaling cluster: head (0 CPUs) at {address}, 0-{args.workers} workers of 1 CPU, "
              f"temp dir {temp_dir}", flush=True)

        # This driver too: with the variable unset Ray turns 127.0.0.1 into the machine's address,
        # where a head started with --node-ip-address=127.0.0.1 does not listen.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        import ray
        import ray.data

        from ovseg_ray.mining.config import MiningConfig
        from ovseg_ray.mining.pipeline import mine_pairs
        from ovseg_ray.raycluster import init_ray

        init_ray(address=address)
        ray.data.DataContext.get_current().enable_progress_bars = False
        output = work / "cluster"
        with Timeline() as timeline:
            result = mine_pairs(MiningConfig.model_validate(mining_config(data, output, args.max_actors)))
            print(f"mining done at {time.monotonic() - timeline.start:.1f}s: {result.summary_line()}", flush=True)
            waited = time.monotonic()
            while timeline.snapshot()[0] > 0 and time.monotonic() - waited < args.removal_timeout:
                time.sleep(2)
            time.sleep(1.5)
        end_workers = timeline.snapshot()[0]
        if reference.wait(timeout=3600) != 0:
            raise RuntimeError(f"the single-node reference failed:\n{(work / 'reference.err').read_text()[-3000:]}")
        out = (work / "reference.out").read_text()
        print(f"single-node reference (done at {time.monotonic() - started:.0f}s): {out.strip().splitlines()[-1]}",
              flush=True)
        same = pair_rows(output) == pair_rows(work / "reference")
        grew = {name: timeline.max_alive(name) for name in POOL_NAMES}
        print(f"nodes: 0 -> {timeline.max_workers()} -> {end_workers}; most actors alive at once: "
              + ", ".join(f"{name} {count}" for name, count in grew.items())
              + f"; pairs equal to the single-node run: {same} ({len(pair_rows(output))} pairs)")
        ok = (timeline.rows[0][1] == 0 and timeline.max_workers() >= 2 and max(grew.values()) >= 2 and same
              and end_workers == 0)
        print("verdict: " + ("PASS" if ok else "FAIL") + " (nodes added from zero, a pool with >= 2 actors at once, "
              "output equal to a single-node run, nodes removed afterwards)")
        verdict = 0 if ok else 1
        ray.shutdown()
    finally:
        if reference.poll() is None:
            reference.wait(timeout=3600)
        stopped = stop_own_processes(temp_dir)
        print(f"stopped the {stopped} processes of this script's cluster that were still running", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return verdict


if __name__ == "__main__":
    sys.exit(main())
