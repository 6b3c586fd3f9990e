"""SHA-256 of many streams at once, one thread per lane, beside the ordered pipeline.

Packing and verifying feed every chunk of every tensor through
``fedmerge.checkpoints.pipeline.run_ordered``; its consumer hands each chunk to ``HashLanes``,
which hashes different tensors on different cores (one tensor's SHA-256 is sequential).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from typing import Any, Callable

from fedmerge.checkpoints.pipeline import DEFAULT_WORKERS


class HashLanes:
    """SHA-256 of many streams at once: one thread per lane, each stream pinned to one lane.

    SHA-256 of one tensor is sequential, but different tensors are independent. Streams are
    dealt to lanes in turn; chunks of a stream arrive at its lane in order (the caller feeds them
    in order), so each digest is exactly the SHA-256 of the stream's bytes. ``on_done(hexdigest)``
    runs in the lane thread when a stream ends; the first exception from it stops everything and
    is raised by ``close`` (or by the next ``update``). ``update(..., after=f)`` calls ``f()``
    once the lane is done with the block (hashed, or skipped after a failure): that is where the
    block's bytes are given back to the pipeline's ``ByteBudget``.
    """

    def __init__(self, lanes: int = DEFAULT_WORKERS, depth: int = 8):
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
            kind, key, payload, after = msg
            try:
                if self._failure:
                    continue  # keep draining so the feeder never blocks
                if kind == "data":
                    h = hashes.get(key)
                    if h is None:
                        h = hashes[key] = hashlib.sha256()
                    h.update(payload)
                else:
                    h = hashes.pop(key, None) or hashlib.sha256()
                    payload(h.hexdigest())
            except BaseException as exc:
                self._failure.append(exc)
            finally:
                if after is not None:
                    after()

    def _check(self) -> None:
        if self._failure:
            raise self._failure[0]

    def update(self, key: Any, data, after: Callable[[], None] | None = None) -> None:
        self._check()
        q = self._lane.get(key)
        if q is None:
            q = self._lane[key] = self._queues[self._next % len(self._queues)]
            self._next += 1
        q.put(("data", key, data, after))

    def finish(self, key: Any, on_done: Callable[[str], None]) -> None:
        self._check()
        q = self._lane.pop(key, None) or self._queues[self._next % len(self._queues)]
        q.put(("done", key, on_done, None))

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
