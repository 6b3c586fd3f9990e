"""BufferPool: large buffers come back and go out again; small ones and strangers are left alone."""

from __future__ import annotations

import threading

import torch

from fedmerge.checkpoints.buffers import BufferPool


def test_a_given_back_buffer_is_handed_out_again_for_the_same_size_and_dtype():
    pool = BufferPool(min_bytes=1024, keep=2)
    a = pool.empty((64, 32), torch.float32)  # 8 KiB
    assert a.shape == (64, 32) and a.dtype == torch.float32
    ptr = a.data_ptr()
    pool.give(a)
    b = pool.empty((32, 64), torch.float32)  # same element count, other shape
    assert b.data_ptr() == ptr and b.shape == (32, 64)
    c = pool.empty((64, 32), torch.bfloat16)  # other dtype: a buffer of its own
    assert c.data_ptr() != ptr
    assert (pool.allocated, pool.reused) == (2, 1)


def test_small_requests_and_foreign_tensors_are_not_pooled():
    pool = BufferPool(min_bytes=1 << 20)
    small = pool.empty((10,), torch.float32)
    stranger = torch.zeros(1 << 18)  # 1 MiB, but not the pool's
    pool.give(small, stranger, None)
    assert pool.allocated == 0
    big = pool.empty((1 << 18,), torch.float32)  # exactly 1 MiB: from the pool, not the stranger
    assert pool.allocated == 1 and pool.reused == 0 and big.data_ptr() != stranger.data_ptr()
    pool.give(big)
    assert pool.empty((1 << 18,), torch.float32).data_ptr() == big.data_ptr()


def test_a_buffer_comes_back_once():
    pool = BufferPool(min_bytes=16, keep=4)
    a = pool.empty((100,), torch.float32)
    pool.give(a)
    pool.give(a)  # twice: the second is ignored
    x, y = pool.empty((100,), torch.float32), pool.empty((100,), torch.float32)
    assert x.data_ptr() != y.data_ptr()  # not the same buffer handed to two users


def test_at_most_keep_buffers_wait_per_size():
    pool = BufferPool(min_bytes=16, keep=2)
    held = [pool.empty((50,), torch.float32) for _ in range(4)]
    pool.give(*held)
    again = [pool.empty((50,), torch.float32) for _ in range(4)]
    assert pool.reused == 2 and pool.allocated == 6
    assert len({t.data_ptr() for t in again}) == 4


def test_views_are_given_back_as_their_whole_buffer():
    pool = BufferPool(min_bytes=16)
    a = pool.empty((10, 10), torch.float32)
    pool.give(a[3:5])  # a view into it stands for the buffer
    b = pool.empty((100,), torch.float32)
    assert b.data_ptr() == a.data_ptr() and b.numel() == 100


def test_threads_never_share_a_buffer():
    pool = BufferPool(min_bytes=16, keep=8)
    seen: list[int] = []
    lock = threading.Lock()
    clash = []

    def work():
        for _ in range(200):
            t = pool.empty((256,), torch.float32)
            with lock:
                if t.data_ptr() in seen:
                    clash.append(t.data_ptr())
                seen.append(t.data_ptr())
            t.fill_(1.0)
            with lock:
                seen.remove(t.data_ptr())
            pool.give(t)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not clash
