"""Local launches: N gloo processes on 127.0.0.1 running one function, results back by rank.

For trying a plan on one machine (`pipecc run`) and for tests; multi-node runs use torchrun.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipecc.errors import PipelineRuntimeError


class RankFailure:
    """What a rank raised, carried back to the launching process."""

    def __init__(self, rank: int, message: str, trace: str) -> None:
        self.rank, self.message, self.trace = rank, message, trace


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn: Callable[..., object], args: tuple,
               out_dir: str, num_threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(num_threads)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False)  # hosted by the launcher: rendezvous_store
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        result = fn(*args)
    except BaseException as err:  # reported to the parent, which raises it
        failure = RankFailure(rank, f"{type(err).__name__}: {err}", traceback.format_exc())
        torch.save(failure, Path(out_dir) / f"rank{rank}.pt")
        # Exit at once without tearing down the group: the parent sees the exit code and
        # terminates the other ranks instead of letting them wait for this one's messages.
        os._exit(1)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()
    # Skip interpreter finalisation: gloo's C++ threads torn down there can abort the process
    # ("terminate called without an active exception", seen once in a calibration run) after
    # the result is written, which the parent would take for a crashed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rendezvous_store(port: int) -> dist.TCPStore:
    """The ranks' key-value store, hosted by the launching process (as torchrun's agent hosts it), so
    it outlives every rank: a rank reading the others' failure reports never finds it gone with rank 0."""
    return dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)


def spawn_local(fn: Callable[..., object], world_size: int, *args: object, num_threads: int = 1) -> list[object]:
    """Run `fn(*args)` on `world_size` fresh gloo processes on 127.0.0.1; their results by rank.

    `fn` must be importable (a module-level function). Each process has torch.distributed
    initialised and `num_threads` intra-op threads. If a rank raises, PipelineRuntimeError
    names it and carries its traceback.
    """
    port = free_port()
    store = rendezvous_store(port)  # noqa: F841  (held until every rank has exited)
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_rank_main, args=(world_size, port, fn, args, out_dir, num_threads),
                               nprocs=world_size, join=True, start_method="spawn")
        except mp.ProcessExitedException as exited:
            raise _failure(Path(out_dir), world_size, exited) from None
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _failure(out_dir: Path, world_size: int, exited: mp.ProcessExitedException) -> PipelineRuntimeError:
    """The error of the first rank that reported one (a cause before a rank that only lost its peer),
    else of the rank whose exit was seen."""
    from pipecc.runtime.dist import connection_lost

    failures = [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)
                if (out_dir / f"rank{rank}.pt").exists()]
    failures = [f for f in failures if isinstance(f, RankFailure)]
    for result in sorted(failures, key=lambda f: (f.message.startswith("PeerLostError") or connection_lost(f.message),
                                                  f.rank)):
        err = PipelineRuntimeError(f"rank {result.rank} failed: {result.message}")
        err.add_note(result.trace)
        return err
    return PipelineRuntimeError(f"rank {exited.error_index} exited with code {exited.exit_code} "
                                "without reporting an error (killed, or out of memory?).")
