"""Run a function on P gloo ranks on the CPU, with hard time limits.

`run_ranks(fn, P, *args)` spawns P processes, each joins a gloo group (TCP store on a free local
port, collective timeout `COLLECTIVE_TIMEOUT_S`) and calls fn(rank, P, *args). An exception in any
rank is raised in the caller (torch.multiprocessing terminates the other ranks); a run that outlives
`timeout` is killed and raises TimeoutError, so a failing rank never hangs the suite.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )  # fmt: skip
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 60.0) -> None:
    """Call fn(rank, world_size, *args) on `world_size` gloo ranks; re-raise the first failure."""
    context = mp.spawn(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):  # raises ProcessRaisedException / ProcessExitedException
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{world_size} ranks of {fn.__name__} did not finish within {timeout} s")
