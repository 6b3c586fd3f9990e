"""Large CPU buffers handed out again and again instead of being allocated afresh for each tensor.

A merge that holds whole tensors (TIES, DARE, the spectral methods...) reads, widens and
subtracts the same few shapes layer after layer: for the 1.12 B set, ~200 MB of 23-46 MB blocks
per MLP matrix. glibc serves blocks that large with fresh mappings and unmaps them on free, and
the engine trims the heap to keep peak memory bounded, so every block was faulted in and zeroed
anew: 4-6 M page faults and 14-20 s of kernel time per TIES merge on this machine, where each
fresh page also costs the host a fault. ``BufferPool`` keeps the blocks of each (dtype, size)
that come back and hands them out again; smaller requests go to the allocator as before.

A buffer must be given back only when nothing else holds it: the engine gives back what it
read for an item once the item's result is computed, and the result (or an input it aliases)
once it is written.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence


class BufferPool:
    """Thread-safe free lists of flat CPU tensors keyed by (dtype, element count)."""

    def __init__(self, min_bytes: int = 16 * 1024**2, keep: int = 2):
        self.min_bytes = int(min_bytes)
        self.keep = int(keep)
        self._free: dict[tuple[Any, int], list[Any]] = {}
        self._out: dict[int, tuple[Any, int]] = {}  # storage address -> key, for buffers handed out
        self._lock = threading.Lock()
        self.reused = 0
        self.allocated = 0

    def empty(self, shape: Sequence[int], dtype):
        """An uninitialised CPU tensor of ``shape`` and ``dtype`` (from the pool when large)."""
        import torch

        numel = 1
        for d in shape:
            numel *= int(d)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if numel * itemsize < self.min_bytes:
            return torch.empty(tuple(shape), dtype=dtype)
        key = (dtype, numel)
        with self._lock:
            free = self._free.get(key)
            buf = free.pop() if free else None
            if buf is not None:
                self.reused += 1
        if buf is None:
            buf = torch.empty(numel, dtype=dtype)
            with self._lock:
                self.allocated += 1
        with self._lock:
            self._out[buf.untyped_storage().data_ptr()] = key
        return buf.view(tuple(shape))

    def give(self, *tensors) -> None:
        """Take back buffers this pool handed out (anything else, and ``None``, is ignored)."""
        for t in tensors:
            if t is None or getattr(t, "device", None) is None or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            with self._lock:
                key = self._out.pop(storage.data_ptr(), None)
                if key is None:
                    continue
                dtype, numel = key
                if t.dtype != dtype or storage.nbytes() != numel * t.element_size():
                    continue  # another tensor now lives where one of ours did
                free = self._free.setdefault(key, [])
                if len(free) < self.keep:
                    free.append(t.new_empty(0).set_(storage, 0, (numel,)))

    def release_idle(self) -> None:
        """Let go of the buffers waiting to be handed out (those handed out stay tracked): before
        work of other shapes, which would otherwise find them resident and unused."""
        with self._lock:
            self._free.clear()

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._out.clear()
