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


def _policy_seen_by_a_fresh_process(env_policy: str | None) -> str:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    code = "import os, fedmerge.checkpoints.codecs, torch; print(os.environ['OMP_WAIT_POLICY'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_openmp_threads_wait_passively_unless_the_user_says_otherwise():
    # set by importing any part of fedmerge, before torch is loaded (OpenMP reads it then)
    assert _policy_seen_by_a_fresh_process(None) == "PASSIVE"
    assert _policy_seen_by_a_fresh_process("ACTIVE") == "ACTIVE"
