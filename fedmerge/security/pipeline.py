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
