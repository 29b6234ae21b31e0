"""Dask plumbing shared by ingest and prediction: the embedded LocalCluster or a client of an
existing scheduler, worker-process set-up, tasks run under one progress bar.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
import uuid
import warnings
from contextlib import ExitStack, contextmanager

import dask
from tqdm import tqdm

from wsicell.errors import WsicellError


@functools.lru_cache(maxsize=1)
def prepare_worker() -> None:
    """Once per worker process: one thread for OpenCV and BLAS (parallelism comes from
    Dask), and glibc's allocator told to keep freed memory for reuse."""
    import cv2
    from threadpoolctl import threadpool_limits

    cv2.setNumThreads(1)
    threadpool_limits(1)
    _reuse_freed_memory()


def _reuse_freed_memory() -> None:
    """Serve large arrays from glibc's heap instead of fresh ``mmap`` pages.

    By default every temporary array of a tile (tens of MB) is a new mapping whose pages
    the kernel faults in and zeroes, then unmaps; reusing the heap made the tile kernel
    about 15% faster here.  Memory stays bounded by the largest tile's working set.
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc only (not musl)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 256 << 20)
        mallopt(_M_TRIM_THRESHOLD, 512 << 20)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


#: Dask's housekeeping intervals for the embedded LocalCluster.  With the defaults (event-loop
#: checks every 20 ms, worker memory every 100 ms, system monitor every 500 ms) the client
#: process of an idle two-worker cluster used 7.9% of a core here, with these 1.7%; the
#: profiler samples every worker's stack 10x less often.  On a laptop whose cores all run
#: workers, that time is taken from segmentation.  An existing cluster (``scheduler=``)
#: keeps its own configuration.
LOCAL_CLUSTER_POLLING = {
    "distributed.admin.tick.interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "500ms",
    "distributed.worker.profile.interval": "100ms",
}


#: Where the embedded cluster's dashboard listens: this machine only, on a free port.
DASHBOARD = "127.0.0.1:0"
#: Seconds a run waits with no Dask worker alive before it gives up.
NO_WORKER_TIMEOUT_S = 60.0


def local_cluster(workers: int, threads_per_worker: int, memory_limit: str,
                  dashboard: str | None = DASHBOARD):
    """A LocalCluster of worker processes with :data:`LOCAL_CLUSTER_POLLING`, listening on
    127.0.0.1 only; its dashboard at ``dashboard`` (``host:port``; None: no dashboard)."""
    from distributed import LocalCluster

    with dask.config.set(LOCAL_CLUSTER_POLLING):  # the workers inherit it from their nannies
        return LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                            memory_limit=memory_limit, processes=True, host="127.0.0.1",
                            dashboard_address=dashboard, silence_logs=logging.ERROR)


#: Attempts at starting the embedded cluster: a worker killed while it starts (the OOM
#: killer, a busy machine) fails the whole start, and a second start usually succeeds.
START_ATTEMPTS = 3


def start_local_cluster(workers: int, threads_per_worker: int, memory_limit: str,
                        dashboard: str | None = DASHBOARD):
    """:func:`local_cluster` and a client of it, started up to :data:`START_ATTEMPTS` times.

    Returns
    -------
    (LocalCluster, Client)

    Raises
    ------
    WsicellError
        Every attempt failed (one line: the attempts and the last reason).
    """
    from distributed import Client

    reason = ""
    for attempt in range(1, START_ATTEMPTS + 1):
        cluster = None
        try:
            cluster = local_cluster(workers, threads_per_worker, memory_limit, dashboard)
            return cluster, Client(cluster)
        except (RuntimeError, OSError, TimeoutError) as err:  # a worker died, a port taken
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if cluster is not None:
                cluster.close()
            if attempt < START_ATTEMPTS:
                warnings.warn(f"the local Dask cluster failed to start ({reason}); "
                              f"retrying ({attempt + 1}/{START_ATTEMPTS})", stacklevel=2)
    raise WsicellError(
        f"the local Dask cluster of {workers} worker(s) failed to start {START_ATTEMPTS} times "
        f"(last: {reason}); most often its workers died while starting: check free memory "
        "and --memory-limit, or lower --workers")


@contextmanager
def dask_client(workers: int, threads_per_worker: int, memory_limit: str,
                scheduler: str | None, progress: bool, dashboard: str | None = DASHBOARD):
    """A client of an existing scheduler, or of a LocalCluster of worker processes (its
    dashboard at ``dashboard``, see :func:`local_cluster`)."""
    from distributed import Client

    if scheduler:
        # a scheduler file (dask scheduler --scheduler-file, dask-jobqueue) or an address
        target = ({"scheduler_file": scheduler} if os.path.isfile(scheduler)
                  else {"address": scheduler})
        try:
            client = Client(**target, timeout="20s")
        except (OSError, TimeoutError, ValueError, KeyError) as err:
            raise WsicellError(
                f"{scheduler}: cannot connect to the Dask scheduler ({err})") from None
        cluster = None
    else:
        cluster, client = start_local_cluster(workers, threads_per_worker, memory_limit,
                                              dashboard)
    if progress and (scheduler or dashboard):
        # above any progress bar, never run into it
        tqdm.write(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


class TileProgress:
    """One progress bar of tissue tiles over all the slides of a run, shared by the threads
    that ingest them: its total grows as slides are planned.

    The bar appears only once there are tiles left to segment (slides already ingested
    show none), so lines printed before (the Dask dashboard link) never run into it;
    messages go above the bar, or plainly to stderr while there is none.
    """

    def __init__(self, desc: str, enabled: bool):
        self.enabled = enabled
        self._desc = desc
        self._bar = None
        self._lock = threading.Lock()

    def add(self, total: int, done: int = 0) -> None:
        """Count ``total`` more tiles, ``done`` of them already finished."""
        with self._lock:
            if self._bar is None:
                if total <= done:
                    return
                self._bar = tqdm(total=total, initial=done, desc=self._desc, unit="tile",
                                 disable=not self.enabled, file=sys.stderr, dynamic_ncols=True)
                return
            self._bar.total += total
            self._bar.update(done)
            self._bar.refresh()

    def update(self, n: int) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.update(n)

    def message(self, text: str) -> None:
        if self.enabled:
            with self._lock:
                if self._bar is None:
                    print(text, file=sys.stderr, flush=True)
                else:
                    self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def phase_bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="tile", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=False)


def run_tasks(client, submissions, bar):
    """Submit ``(key, weight, fn, args)`` tasks and wait for all, adding the weights of the
    finished ones to ``bar`` (anything with ``update(n)``).

    Returns the results in submission order.  A task's exception (e.g. a
    :class:`WsicellError` from an unreadable region) cancels the rest and is raised here.

    Raises
    ------
    WsicellError
        No worker has been alive for :data:`NO_WORKER_TIMEOUT_S` seconds while tasks wait,
        or a task killed the workers that ran it (most often: out of memory).
    """
    from distributed import KilledWorker, wait

    token = uuid.uuid4().hex[:8]
    memory = _memory_hint(client)  # before a dead worker leaves the scheduler
    futures = {client.submit(fn, *args, key=f"wsicell-{key}-{token}", pure=False): weight
               for key, weight, fn, args in submissions}
    pending, alone_since = set(futures), None
    try:
        while pending:
            try:
                done, pending = wait(pending, timeout=2, return_when="FIRST_COMPLETED")
            except TimeoutError:
                alone_since = _check_workers(client, alone_since)
                continue
            alone_since = None
            for future in done:
                future.result()
                bar.update(futures[future])
    except KilledWorker as err:
        client.cancel(list(futures))
        raise WsicellError(f"a Dask worker died running {err.task!r} ({memory}): "
                           "raise --memory-limit or lower --threads-per-worker") from None
    except BaseException:
        client.cancel(list(futures))
        raise
    return [future.result() for future in futures]


def _check_workers(client, alone_since: float | None) -> float | None:
    """When the scheduler has no worker: the time since when (raising past the timeout)."""
    if client.scheduler_info().get("workers"):
        return None
    now = time.monotonic()
    alone_since = alone_since or now
    if now - alone_since > NO_WORKER_TIMEOUT_S:
        raise WsicellError(f"{client.scheduler.address}: no Dask worker alive for "
                           f"{NO_WORKER_TIMEOUT_S:.0f} s while tasks wait (the workers died or "
                           "never joined the scheduler; see their logs)")
    return alone_since


def _memory_hint(client) -> str:
    limits = {w.get("memory_limit") for w in client.scheduler_info().get("workers", {}).values()}
    limits.discard(None)
    return (f"out of memory? limit {dask.utils.format_bytes(max(limits))} per worker"
            if limits else "out of memory?")


@contextmanager
def lazy_client(*args):
    """A callable returning the Dask client, started on first use (skipped slides need none)."""
    with ExitStack() as stack:
        holder: list = []
        lock = threading.Lock()

        def get():
            with lock:
                if not holder:
                    holder.append(stack.enter_context(dask_client(*args)))
                return holder[0]

        yield get
