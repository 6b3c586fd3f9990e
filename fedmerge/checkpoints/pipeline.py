"""A bounded, ordered thread pipeline: produce -> work in a pool -> consume in order.

File reads, hashing (hashlib), AES-GCM (cryptography) and torch arithmetic release the GIL on
large buffers, so three stages overlap on separate cores: the caller's thread produces items, a
pool transforms them, and one consumer thread takes the results in their original order. Memory
is bounded twice: at most ``depth`` items are queued, and with a ``ByteBudget`` the producer
waits while the items it let through hold more than the budget's bytes, however large each item
is and however long the consumer's own back end keeps them.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))


class PipelineStopped(Exception):
    """Raised in a producer waiting on a ``ByteBudget`` that was closed because a stage failed."""


class ByteBudget:
    """Bytes in flight, bounded: ``acquire(n)`` waits until ``n`` more fit under ``limit``.

    A single item larger than the whole budget is let through alone (when nothing else is in
    flight), so the pipeline never deadlocks on it. ``release(n)`` is called by whichever stage
    is last to hold the bytes; ``close`` wakes every waiter with ``PipelineStopped``.
    """

    def __init__(self, limit: int):
        if limit <= 0:
            raise ValueError("a byte budget must be positive")
        self.limit = int(limit)
        self.held = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._closed = False

    def acquire(self, n: int) -> None:
        with self._cond:
            while not self._closed and self.held and self.held + n > self.limit:
                self._cond.wait()
            if self._closed:
                raise PipelineStopped("the pipeline stopped")
            self.held += n
            self.peak = max(self.peak, self.held)

    def release(self, n: int) -> None:
        with self._cond:
            self.held -= n
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def run_ordered(
    items: Iterable[Any],
    work: Callable[[Any], Any],
    sink: Callable[[Any, Any], None],
    workers: int = DEFAULT_WORKERS,
    depth: int = 8,
    budget: ByteBudget | None = None,
    cost: Callable[[Any], int] | None = None,
) -> None:
    """Call ``sink(item, work(item))`` for every item, in order; ``work`` runs in a pool.

    With ``budget``, ``cost(item)`` bytes are acquired before an item is handed to the pool;
    the caller releases them (in ``sink`` or in a later stage of its own). The first exception
    from any stage stops the pipeline and is raised here.
    """
    if budget is not None and cost is None:
        raise ValueError("a byte budget needs the cost of each item")
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    failure: list[BaseException] = []
    stop = threading.Event()

    def consume() -> None:
        try:
            while True:
                entry = q.get()
                if entry is None:
                    return
                item, fut = entry
                sink(item, fut.result())
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)
            stop.set()
            if budget is not None:
                budget.close()  # a producer waiting for bytes this consumer will never release
            while q.get() is not None:  # keep draining so the producer never blocks
                pass

    consumer = threading.Thread(target=consume, name="fedmerge-sink", daemon=True)
    consumer.start()
    produced: BaseException | None = None
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="fedmerge-work") as pool:
        try:
            for item in items:
                if stop.is_set():
                    break
                if budget is not None:
                    budget.acquire(cost(item))  # type: ignore[misc]
                q.put((item, pool.submit(work, item)))
        except PipelineStopped:
            pass  # the consumer's failure is raised below
        except BaseException as exc:
            produced = exc
        finally:
            q.put(None)
            consumer.join()
    if failure:
        raise failure[0]
    if produced is not None:
        raise produced
