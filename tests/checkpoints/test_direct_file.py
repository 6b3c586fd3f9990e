"""SequentialFile: the bytes on disk are exactly the bytes written, around the page cache or not."""

from __future__ import annotations

import errno
import os
import random

import pytest

from fedmerge.checkpoints import direct_file
from fedmerge.checkpoints.direct_file import BLOCK, BUFFER, SequentialFile


def _pieces(total: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out, left = [], total
    while left:
        n = min(left, rng.choice([1, 7, BLOCK - 1, BLOCK, BLOCK + 3, 100_000, BUFFER - 5, BUFFER + 11]))
        out.append(rng.randbytes(n))
        left -= n
    return out


@pytest.mark.parametrize("total", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, BUFFER - 1, BUFFER, BUFFER + 5, 2 * BUFFER + 3 * BLOCK + 17])
@pytest.mark.parametrize("direct", [True, False])
def test_file_holds_exactly_what_was_written(tmp_path, total, direct):
    pieces = _pieces(total, seed=total)
    path = tmp_path / "out.bin"
    f = SequentialFile(path, direct=direct)
    for p in pieces:
        assert f.write(memoryview(p)) == len(p)
    f.close(durable=True)
    assert f.closed
    assert path.stat().st_size == total  # the padding of the last block is cut off again
    assert path.read_bytes() == b"".join(pieces)


def _takes_o_direct(folder) -> bool:
    probe = os.path.join(folder, ".probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        return True
    except (OSError, AttributeError):
        return False
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


def test_direct_io_is_used_exactly_where_the_filesystem_offers_it(tmp_path):
    f = SequentialFile(tmp_path / "a", direct=True)
    assert f.direct == _takes_o_direct(tmp_path)  # and the page cache otherwise
    f.close()
    g = SequentialFile(tmp_path / "b", direct=False)
    assert not g.direct
    g.close()


def _refusing_open(monkeypatch):
    """Make ``os.open`` refuse O_DIRECT the way tmpfs and other filesystems do (EINVAL)."""
    real_open = os.open
    o_direct = getattr(os, "O_DIRECT", 0)

    def open_(path, flags, *args):
        if o_direct and flags & o_direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_file.os, "open", open_)


def test_a_filesystem_without_direct_io_gets_the_same_bytes(tmp_path, monkeypatch):
    _refusing_open(monkeypatch)
    path = tmp_path / "out.bin"
    f = SequentialFile(path, direct=True)
    assert not f.direct
    data = random.Random(1).randbytes(BUFFER + 123)
    f.write(data)
    f.close()
    assert path.read_bytes() == data


def test_a_refused_aligned_write_goes_on_through_the_page_cache(tmp_path, monkeypatch):
    real_write = os.write
    calls = {"n": 0}

    def refusing_write(fd, data):
        calls["n"] += 1
        if calls["n"] == 2:  # the second block: some bytes are already on disk
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    f = SequentialFile(tmp_path / "out.bin", direct=True)
    assert f.direct, f"{tmp_path} does not take O_DIRECT"  # the fallback is what is tested here
    monkeypatch.setattr(direct_file.os, "write", refusing_write)
    data = random.Random(2).randbytes(3 * BUFFER + 999)
    f.write(data[: BUFFER + 10])
    f.write(data[BUFFER + 10 :])
    assert not f.direct
    f.close()
    assert (tmp_path / "out.bin").read_bytes() == data


def test_discard_closes_without_finishing(tmp_path):
    f = SequentialFile(tmp_path / "out.bin", direct=True)
    fd = f.fileno()
    f.write(b"x" * 10)
    f.discard()
    assert f.closed
    with pytest.raises(OSError):
        os.fstat(fd)
    f.close()  # closing again is a no-op


@pytest.mark.parametrize("direct", [False, True])
def test_checkpoint_writer_folders_are_the_same_either_way(tmp_path, direct):
    import torch

    from fedmerge.checkpoints import CheckpointReader, CheckpointWriter

    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(37 + i, 129, generator=g).to(torch.bfloat16) for i in range(5)}
    out = tmp_path / f"m{int(direct)}"
    with CheckpointWriter(out, max_shard_bytes=40_000, direct=direct) as w:
        w.plan([(n, tuple(t.shape), "BF16") for n, t in tensors.items()])
        for n, t in tensors.items():
            half = t.shape[0] // 2
            w.add_part(n, t[:half], final=False)
            w.add_part(n, t[half:], final=True)
        w.commit()
    r = CheckpointReader(out)
    assert sorted(r.names()) == sorted(tensors)
    for n, t in tensors.items():
        assert torch.equal(r.get(n), t)
    assert len(list(out.glob("*.safetensors"))) > 1  # several shards, each finished and cut to size
