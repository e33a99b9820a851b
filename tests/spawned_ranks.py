"""Run a function as the ranks of a small process group (spawned processes, a free loopback port): the
DDP tests compare what each rank computed with one process's result."""

from __future__ import annotations

import socket
from typing import Any, Callable


def run_ranks(target: Callable[[int, int, Any], None], world: int = 2, timeout: float = 120) -> list:
    """``target(rank, port, results)`` in ``world`` spawned processes; each puts its outcome on ``results``.

    Returns the outcomes (in arrival order) once every process has exited with status 0.
    """
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    workers = [context.Process(target=target, args=(rank, port, results)) for rank in range(world)]
    for worker in workers:
        worker.start()
    outcome = [results.get() for _ in workers]
    for worker in workers:
        worker.join(timeout=timeout)
        assert worker.exitcode == 0, worker.exitcode
    return outcome
