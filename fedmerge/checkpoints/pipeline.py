"""The bounded, ordered thread pipeline: produce -> stage -> ... -> consume, in order.

File reads, hashing (hashlib), AES-GCM (cryptography) and torch arithmetic release the GIL on
large buffers, so stages overlap on separate cores: the caller's thread produces items, each
stage transforms them on its own threads, and one consumer thread takes the results in their
original order. Memory is bounded twice: at most ``depth`` items are between the producer and
the consumer, and with a ``ByteBudget`` the producer waits while the items it let through hold
more than the budget's bytes, however large each item is and however long the consumer's own
back end keeps them.

``run_pipeline(items, stages, sink)`` is the primitive; a ``Stage`` with one worker sees the
items strictly one after another, in order (what a stage that reads files sequentially, or that
keeps running state, needs), one with several workers transforms several items at once. The
security layer packs and verifies with one pooled stage (``run_ordered``); the merge engine reads,
computes and writes with two single-worker stages and the consumer.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

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


@dataclass(frozen=True)
class Stage:
    """One step between producer and consumer: ``fn(item, value) -> value``, where ``value`` is
    what the previous stage returned (the item itself for the first stage). ``workers`` threads
    run it; with one, items pass strictly in order, one at a time."""

    fn: Callable[[Any, Any], Any]
    workers: int = 1
    name: str = "work"


class _Failure:
    """The first exception of any stage (first in time); stops every stage not yet started."""

    def __init__(self, budget: ByteBudget | None):
        self.budget = budget
        self.first: BaseException | None = None
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def record(self, exc: BaseException) -> None:
        if isinstance(exc, PipelineStopped):
            return
        with self._lock:
            if self.first is None:
                self.first = exc
        self.stop.set()
        if self.budget is not None:
            self.budget.close()  # a producer waiting for bytes nobody will release

    def run(self, fn: Callable[[Any, Any], Any], item: Any, previous: Future | None) -> Any:
        """One stage on one item, unless the pipeline has stopped."""
        if self.stop.is_set():
            raise PipelineStopped("the pipeline stopped")
        value = item if previous is None else previous.result()  # an earlier stage's failure propagates
        if self.stop.is_set():
            raise PipelineStopped("the pipeline stopped")
        try:
            return fn(item, value)
        except BaseException as exc:
            self.record(exc)
            raise


def run_pipeline(
    items: Iterable[Any],
    stages: Sequence[Stage],
    sink: Callable[[Any, Any], None],
    *,
    depth: int = 8,
    budget: ByteBudget | None = None,
    cost: Callable[[Any], int] | None = None,
) -> None:
    """Call ``sink(item, value)`` for every item, in order, where ``value`` is the item passed
    through every stage; the stages run on their own threads and overlap with the producer (the
    caller's thread iterating ``items``) and the consumer (one thread calling ``sink``).

    With ``budget``, ``cost(item)`` bytes are acquired before an item enters the first stage; the
    caller releases them (in ``sink`` or in a later stage of its own). The first exception from
    any stage stops the pipeline: items not yet started are dropped, and it is raised here.
    """
    if budget is not None and cost is None:
        raise ValueError("a byte budget needs the cost of each item")
    if not stages:
        raise ValueError("a pipeline needs at least one stage")
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    failure = _Failure(budget)

    def consume() -> None:
        try:
            while True:
                entry = q.get()
                if entry is None:
                    return
                item, fut = entry
                sink(item, fut.result())
        except BaseException as exc:  # handed to the caller's thread below
            failure.record(exc)
            while (entry := q.get()) is not None:  # keep draining so the producer never blocks
                entry[1].cancel()

    pools = [ThreadPoolExecutor(max_workers=max(1, s.workers), thread_name_prefix=f"fedmerge-{s.name}") for s in stages]
    consumer = threading.Thread(target=consume, name="fedmerge-sink", daemon=True)
    consumer.start()
    produced: BaseException | None = None
    try:
        for item in items:
            if failure.stop.is_set():
                break
            if budget is not None:
                budget.acquire(cost(item))  # type: ignore[misc]
            fut: Future | None = None
            for stage, pool in zip(stages, pools):
                fut = pool.submit(failure.run, stage.fn, item, fut)
            q.put((item, fut))
    except PipelineStopped:
        pass  # a stage's failure is raised below
    except BaseException as exc:
        produced = exc
        failure.stop.set()
    finally:
        q.put(None)
        consumer.join()
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
    if failure.first is not None:
        raise failure.first
    if produced is not None:
        raise produced


def run_ordered(
    items: Iterable[Any],
    work: Callable[[Any], Any],
    sink: Callable[[Any, Any], None],
    workers: int = DEFAULT_WORKERS,
    depth: int = 8,
    budget: ByteBudget | None = None,
    cost: Callable[[Any], int] | None = None,
) -> None:
    """Call ``sink(item, work(item))`` for every item, in order; ``work`` runs in a pool of
    ``workers`` threads (``run_pipeline`` with one stage)."""
    run_pipeline(items, [Stage(lambda _item, value: work(value), workers)], sink, depth=depth, budget=budget, cost=cost)
