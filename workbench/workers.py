"""Worker processes for work split by subject (sensor tables, features).

Workers are spawned, not forked: a process that has used polars holds its thread pool's locks,
and forking it can deadlock the child. Each worker runs polars on one thread, because the
processes are the parallelism: a pool of polars threads in each of them would only compete for
the same cores and multiply the memory each keeps. This module imports nothing heavy, so that
setting the thread count comes before polars is imported in the worker.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor


def _one_polars_thread() -> None:
    os.environ.setdefault("POLARS_MAX_THREADS", "1")


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes, each running polars on one thread.

    Example: ``with worker_pool(2) as pool: pool.map(build, chunks)``.
    """
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_one_polars_thread,
    )
