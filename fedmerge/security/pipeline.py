"""A small ordered thread pipeline: produce -> work in a pool -> consume in order.

Hashing (hashlib) and AES-GCM (cryptography) release the GIL on large buffers, and so do file
reads and torch arithmetic, so three stages overlap on separate cores: the caller's thread reads
or computes chunks, a pool seals/opens and checks them, and one consumer thread hashes and writes
them in their original order. At most ``depth`` chunks are in flight, which bounds memory by a
few chunks whatever the size of the model.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))


def run_ordered(items: Iterable[Any], work: Callable[[Any], Any], sink: Callable[[Any, Any], None], workers: int = DEFAULT_WORKERS, depth: int = 8) -> None:
    """Call ``sink(item, work(item))`` for every item, in order; ``work`` runs in a pool.

    The first exception from any stage stops the pipeline and is raised here.
    """
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
                q.put((item, pool.submit(work, item)))
        except BaseException as exc:
            produced = exc
        finally:
            q.put(None)
            consumer.join()
    if failure:
        raise failure[0]
    if produced is not None:
        raise produced


class HashLanes:
    """SHA-256 of many streams at once: one thread per lane, each stream pinned to one lane.

    SHA-256 of one tensor is sequential, but different tensors are independent. Streams are
    dealt to lanes in turn; chunks of a stream arrive at its lane in order (the caller feeds them
    in order), so each digest is exactly the SHA-256 of the stream's bytes. ``on_done(hexdigest)``
    runs in the lane thread when a stream ends; the first exception from it stops everything and
    is raised by ``close`` (or by the next ``update``).
    """

    def __init__(self, lanes: int = DEFAULT_WORKERS, depth: int = 8):
        import hashlib

        self._sha256 = hashlib.sha256
        self._queues = [queue.Queue(maxsize=max(1, depth)) for _ in range(max(1, lanes))]
        self._threads = [threading.Thread(target=self._run, args=(q,), name=f"fedmerge-hash-{i}", daemon=True) for i, q in enumerate(self._queues)]
        self._lane: dict[Any, queue.Queue] = {}
        self._next = 0
        self._failure: list[BaseException] = []
        for t in self._threads:
            t.start()

    def _run(self, q: queue.Queue) -> None:
        hashes: dict[Any, Any] = {}
        while True:
            msg = q.get()
            if msg is None:
                return
            if self._failure:
                continue  # keep draining so the feeder never blocks
            kind, key, payload = msg
            try:
                if kind == "data":
                    h = hashes.get(key)
                    if h is None:
                        h = hashes[key] = self._sha256()
                    h.update(payload)
                else:
                    h = hashes.pop(key, None) or self._sha256()
                    payload(h.hexdigest())
            except BaseException as exc:
                self._failure.append(exc)

    def _check(self) -> None:
        if self._failure:
            raise self._failure[0]

    def update(self, key: Any, data) -> None:
        self._check()
        q = self._lane.get(key)
        if q is None:
            q = self._lane[key] = self._queues[self._next % len(self._queues)]
            self._next += 1
        q.put(("data", key, data))

    def finish(self, key: Any, on_done: Callable[[str], None]) -> None:
        self._check()
        q = self._lane.pop(key, None) or self._queues[self._next % len(self._queues)]
        q.put(("done", key, on_done))

    def close(self) -> None:
        """Wait for every digest; raise the first failure."""
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()
        self._check()

    def __enter__(self) -> "HashLanes":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        """Close on leaving the block; an error already on its way is not masked by a digest failure."""
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except Exception:
                pass
        return False
