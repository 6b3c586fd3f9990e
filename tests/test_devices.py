"""torch's CPU thread count: set for a block, put back after it however it ends."""

from __future__ import annotations

import pytest
import torch

from fedmerge.devices import torch_threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def test_threads_are_set_inside_and_restored_after(two_threads):
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == two_threads
    with torch_threads(3):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == two_threads


@pytest.mark.parametrize("n", [None, 0])
def test_none_or_zero_leaves_the_count_alone(two_threads, n):
    with torch_threads(n):
        assert torch.get_num_threads() == two_threads
    assert torch.get_num_threads() == two_threads


def test_restored_when_the_block_raises(two_threads):
    with pytest.raises(RuntimeError, match="boom"):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == two_threads


def test_restored_when_the_block_changes_the_count_itself(two_threads):
    with torch_threads(None):
        torch.set_num_threads(1)
    assert torch.get_num_threads() == two_threads
    with torch_threads(3):
        torch.set_num_threads(1)
    assert torch.get_num_threads() == two_threads
