"""The task queue: its backend, the tasks that run on it, and queueing one now or later.

The backend is chosen here and nowhere else: RedisHuey when a Redis URL is configured
(``[redis] url_env``), else SqliteHuey in the pool (``scheduler.sqlite``). The modules
that own work register it by name, with the home as first argument, and queue it by name:

- :func:`task` registers a task (``run_pipeline`` in :mod:`workbench.pipelines`,
  ``sync_account`` in :mod:`workbench.sync.scheduled`);
- :func:`periodic` registers what runs on a cron schedule (the enabled pipelines);
- :func:`queue_task` queues a registered task at once or for a time, e.g. a sync stopped by a
  rate limit, for when the limit resets;
- :func:`open_queue` gives a home's :class:`Queue`; :func:`run_consumer` runs its workers.

Example::

    from workbench import pipelines, scheduler
    scheduler.queue_task(config, "run_pipeline", "status")
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workbench.config import Config
from workbench.errors import ConfigError
from workbench.pool import DataPool, create_private_file, make_folders

# name -> body(home, *args); what each enabled module adds to every queue
_TASKS: dict[str, Callable[..., Any]] = {}
# each returns the periodic entries of a configuration
_PERIODIC: list[Callable[[Config], list[Periodic]]] = []


@dataclass(frozen=True)
class Periodic:
    """A registered task run on a cron schedule: ``cron`` holds huey's crontab fields."""

    name: str  # the periodic task's own name, e.g. "pipeline.status"
    cron: dict[str, str]
    task: str  # the registered task it runs
    args: tuple = ()


def task(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``body(home, *args)`` as the task ``name`` of every queue; return it unchanged.

    Example: ``@task("run_pipeline")`` over ``def run(home, name, parameters=None): ...``.
    """

    def register(body: Callable[..., Any]) -> Callable[..., Any]:
        _TASKS[name] = body
        return body

    return register


def periodic(entries: Callable[[Config], list[Periodic]]) -> Callable[[Config], list[Periodic]]:
    """Register a function giving a configuration's periodic entries; return it unchanged."""
    _PERIODIC.append(entries)
    return entries


@dataclass
class Queue:
    """One home's huey (backend and tasks); queue work with :meth:`enqueue`."""

    huey: Any
    home: str
    tasks: dict[str, Any] = field(default_factory=dict)  # name -> huey TaskWrapper

    def _wrapper(self, name: str):
        """The huey task of ``name``, added on first use (a module may register after the
        queue was opened)."""
        if name not in self.tasks:
            body = _TASKS.get(name)
            if body is None:
                raise ConfigError(f"no task {name!r} is registered with the scheduler")
            home = self.home

            def run(*args: Any, **kwargs: Any) -> Any:
                return body(home, *args, **kwargs)

            run.__name__ = name
            self.tasks[name] = self.huey.task(name=name)(run)
        return self.tasks[name]

    def enqueue(self, name: str, *args: Any, eta_ms: int | None = None):
        """Queue the task ``name`` with ``args``, at once or for ``eta_ms`` (ms since the
        epoch); return huey's result handle."""
        wrapper = self._wrapper(name)
        if eta_ms is None:
            return wrapper(*args)
        return wrapper.schedule(args=args, eta=_eta(eta_ms))


def _eta(ms: int) -> dt.datetime:
    """An aware UTC datetime: huey reads a naive one as local time, to the whole second."""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def open_queue(config: Config, *, immediate: bool = False) -> Queue:
    """A new queue of ``config``'s home with every registered task and periodic entry;
    ``immediate`` runs each task in the calling thread (for tests).

    Example: ``open_queue(config).huey.pending_count()``.
    """
    from huey import RedisHuey, SqliteHuey, crontab

    url = config.redis_url
    if url:
        huey = RedisHuey("workbench", url=url, immediate=immediate, utc=True)
    else:
        path = DataPool.of(config).scheduler_queue
        make_folders(config.pool)
        create_private_file(path)  # SQLite keeps this mode
        huey = SqliteHuey("workbench", filename=str(path), immediate=immediate, utc=True)
    queue = Queue(huey, str(config.home))
    for name in list(_TASKS):
        queue._wrapper(name)
    for entries in _PERIODIC:
        for entry in entries(config):
            wrapper = queue._wrapper(entry.task)

            def tick(wrapper=wrapper, args=entry.args):
                return wrapper.call_local(*args)

            tick.__name__ = entry.name.replace(".", "_")
            huey.periodic_task(crontab(**entry.cron), name=entry.name)(tick)
    return queue


_queues: dict[tuple, Queue] = {}
_queues_lock = threading.Lock()


def queue_task(config: Config, name: str, *args: Any, eta_ms: int | None = None) -> None:
    """Queue the registered task ``name`` on ``config``'s scheduler, at once or for
    ``eta_ms``; one queue per home is kept open per process.

    Example: ``queue_task(config, "sync_account", 3, "resume", eta_ms=resume_at)``.
    """
    key = (str(config.home), config.redis_url)
    with _queues_lock:
        if key not in _queues:
            _queues[key] = open_queue(config)
        queue = _queues[key]
    queue.enqueue(name, *args, eta_ms=eta_ms)


def run_consumer(config: Config, *, workers: int | None = None) -> None:
    """Run the queue's workers and periodic tasks in the foreground until interrupted."""
    from huey.consumer import Consumer

    queue = open_queue(config)
    consumer = Consumer(
        queue.huey,
        workers=workers or config.pipelines.workers,
        worker_type="thread",
        periodic=True,
        check_worker_health=True,
        # idle workers look at the queue at least every 0.25 s (huey's default backs off to
        # 10 s): a sync requeued for a rate limit's reset must start on time
        initial_delay=0.05,
        max_delay=0.25,
    )
    consumer.run()
