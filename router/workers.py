"""``ballast serve --workers N``: N router processes sharing one listening port.

The parent forks N children before any event loop exists; each child binds the
port with SO_REUSEPORT and the kernel spreads connections across them. The
parent only supervises: it forwards SIGTERM/SIGINT/SIGHUP, restarts a worker
that dies unexpectedly, and cleans up each dead worker's metric files.

Workers share fleet state only through a shared store (Redis); without one,
each routes on what it alone has seen.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

log = logging.getLogger("ballast")


def run_workers(n: int, work: Callable[[], None]) -> int:
    """Fork ``n`` workers running ``work()``; return when all have stopped.

    ``PROMETHEUS_MULTIPROC_DIR`` must be set before prometheus_client is imported.
    """
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            code = 0
            try:
                work()
            except BaseException:
                log.exception("worker %d failed", index)
                code = 1
            os._exit(code)
        children[pid] = index

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for i in range(n):
        spawn(i)
    failures = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, None)
        if index is None:
            continue
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
        code = os.waitstatus_to_exitcode(status)
        if not stopping:
            failures += 1
            log.error("worker %d (pid %d) exited with %d; restarting it", index, pid, code)
            time.sleep(min(5.0, 0.1 * failures))  # do not spin on a worker that cannot start
            spawn(index)
    return 0
