"""Start gloo ranks on this machine for the CPU tests of distributed code."""

import os
import socket
import sys

import torch.multiprocessing as mp


def free_port() -> int:
    """A port free now. Another process can take it before rank 0 binds it: spawn_ranks retries then."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn, world: int, *args, tries: int = 3) -> None:
    """mp.spawn(fn, args=(world, port, *args)) on a free port; fn(rank, world, port, ...) sets MASTER_PORT.

    A port taken between free_port() and rank 0's bind fails the whole group at init, before any rank
    has written anything (the TCPStore's EADDRINUSE); only that failure is retried, on a new port."""
    for attempt in range(tries):
        try:
            mp.spawn(_rank_main, args=(fn, world, free_port(), *args), nprocs=world, join=True)
            return
        except mp.ProcessRaisedException as e:
            if "EADDRINUSE" not in str(e) or attempt == tries - 1:
                raise


def _rank_main(rank: int, fn, world: int, port: int, *args) -> None:
    """One rank: fn(rank, world, port, ...), then leave without the interpreter's teardown. A rank that returned
    has done and written everything (its files closed, its process group destroyed); in the teardown, C++
    static destructors can meet a gloo thread still joinable and abort a finished rank ("terminate called
    without an active exception", SIGABRT), which failed a passing test in CI now and then. An exception in
    fn still fails the rank as before."""
    fn(rank, world, port, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
