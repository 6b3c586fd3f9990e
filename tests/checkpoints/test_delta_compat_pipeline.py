"""The bottom layer's shared pieces: the one delta subtraction, the one compatibility check, the
bounded pipeline, and the writer's raw-bytes parts."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmerge.checkpoints import CheckpointError, CheckpointReader, CheckpointWriter, IncompatibleCheckpoint, TensorInfo
from fedmerge.checkpoints.compat import CompatibilityCheck
from fedmerge.checkpoints.delta import subtract_reference
from fedmerge.checkpoints.pipeline import ByteBudget, run_ordered

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


# -- the one delta subtraction ----------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    model_dtype=st.sampled_from(DTYPES),
    ref_dtype=st.sampled_from(DTYPES),
    values=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=64),
    seed=st.integers(0, 2**16),
)
def test_subtraction_is_bit_identical_to_float_minus_float(model_dtype, ref_dtype, values, seed):
    g = torch.Generator().manual_seed(seed)
    model = torch.tensor(values, dtype=torch.float32).to(model_dtype)
    ref = (torch.randn(len(values), generator=g) * 100).to(ref_dtype)
    want = model.float() - ref.float()
    got = subtract_reference(model.clone(), ref)
    assert got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_packing_and_the_task_vector_share_the_subtraction(tmp_path):
    """A package's delta and the merge engine's task vector are the same bytes, by construction."""
    from fedmerge.merging.taskvector import TaskVector
    from fedmerge.security.pack import FolderPairDelta
    from fedmerge.toymodels import TinyMistralSpec, build_tiny_mistral, perturb_checkpoint

    spec = TinyMistralSpec(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    base = build_tiny_mistral(tmp_path / "base", spec, seed=0, tokenizer=False, dtype="bfloat16")
    ft = perturb_checkpoint(base, tmp_path / "ft", seed=1, scale=0.05)
    tv, pair = TaskVector(ft, base), FolderPairDelta(ft, base)
    for name in tv.names():
        a, b = tv.get_delta(name), pair.get_delta(name)
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), name
        if a.dim() == 2 and a.shape[0] > 2:
            assert torch.equal(tv.get_delta(name, rows=(1, 3)), pair.get_delta(name, rows=(1, 3)))


# -- the one compatibility check ------------------------------------------------------------------
def test_compatibility_lists_every_difference():
    base = {"a": (2, 3), "b": (4,), "c": (1,)}
    check = CompatibilityCheck(base, config={"model_type": "mistral", "hidden_size": 8})
    found = check.compare({"a": (3, 2), "b": (4,), "z": (1,)}, complete=True, config={"model_type": "llama", "hidden_size": 8})
    assert found.architecture == (("model_type", "llama", "mistral"),)
    assert found.missing == ("c",) and found.extra == ("z",) and found.shapes == (("a", (3, 2), (2, 3)),)
    assert not found.ok
    partial = check.compare({"b": (4,)}, complete=False)
    assert partial.ok and partial.missing == () and (partial.input_tensors, partial.base_tensors) == (1, 3)
    assert not partial.config_known and partial.tokenizer == "n/a"


def test_raise_first_names_the_input_the_base_and_the_tensor():
    check = CompatibilityCheck({"a": (2,)})
    with pytest.raises(IncompatibleCheckpoint, match=r"in-1: has no tensor 'a' that the base has \(1 missing\)"):
        check.compare({}, complete=True).raise_first("in-1", "/base")
    with pytest.raises(IncompatibleCheckpoint, match=r"/x.safetensors: tensor 'a' has shape \[3\], the base has \[2\]"):
        check.compare({"a": (3,)}, complete=True).raise_first("in-1", "/base", lambda n: "/x.safetensors")
    check.compare({"a": (2,)}, complete=True).raise_first("in-1", "/base")  # nothing to raise


def test_tokenizers_are_compared_when_asked(tmp_path):
    import json

    for name, vocab in (("base", {"a": 0}), ("same", {"a": 0}), ("other", {"b": 0})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))
    (tmp_path / "none").mkdir()
    check = CompatibilityCheck({}, folder=tmp_path / "base")
    assert [check.compare({}, complete=False, tokenizer_folder=tmp_path / n).tokenizer for n in ("same", "other", "none")] == ["same", "different", "missing"]


# -- the bounded pipeline --------------------------------------------------------------------------
def test_results_arrive_in_order_and_the_budget_bounds_bytes_in_flight():
    budget = ByteBudget(100)
    seen: list[int] = []
    held: list[int] = []

    def work(i):
        time.sleep(0.001 * (i % 3))
        return i

    def sink(i, r):
        seen.append(r)
        held.append(budget.held)
        threading.Timer(0.002, budget.release, args=(30,)).start()  # a later stage lets go

    run_ordered(range(50), work, sink, workers=4, depth=16, budget=budget, cost=lambda i: 30)
    assert seen == list(range(50))
    assert budget.peak <= 90 and max(held) <= 90  # three items of 30 fit under 100, never four


def test_an_item_bigger_than_the_budget_passes_alone():
    budget = ByteBudget(10)
    out: list[int] = []
    run_ordered([1, 2, 3], lambda i: i, lambda i, r: (out.append(r), budget.release(50)), budget=budget, cost=lambda i: 50)
    assert out == [1, 2, 3] and budget.peak == 50


def test_a_failing_stage_never_leaves_the_producer_waiting_for_bytes():
    budget = ByteBudget(10)

    def sink(i, r):
        raise RuntimeError(f"sink failed at {i}")  # never releases anything

    done = threading.Event()
    box: dict = {}

    def go():
        try:
            run_ordered(range(100), lambda i: i, sink, budget=budget, cost=lambda i: 6)
        except RuntimeError as exc:
            box["exc"] = exc
        done.set()

    threading.Thread(target=go, daemon=True).start()
    assert done.wait(30), "the producer stayed blocked on the byte budget"
    assert str(box["exc"]) == "sink failed at 0"


def test_a_budget_needs_the_cost_of_each_item():
    with pytest.raises(ValueError, match="cost"):
        run_ordered([1], lambda i: i, lambda i, r: None, budget=ByteBudget(1))


# -- the writer takes checked bytes in parts ---------------------------------------------------------
def test_add_bytes_writes_planned_tensors_from_unaligned_pieces(tmp_path):
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    b = torch.arange(5, dtype=torch.bfloat16)
    with CheckpointWriter(tmp_path / "out", max_shard_bytes=40) as w:
        w.plan([TensorInfo("a", (3, 4), "F32"), TensorInfo("b", (5,), "BF16")])
        raw = a.numpy().tobytes()
        for lo, hi in ((0, 7), (7, 30), (30, 48)):  # pieces that cut values in half
            w.add_bytes("a", raw[lo:hi], final=hi == 48)
        w.add_bytes("b", b.view(torch.int16).numpy().tobytes(), final=True)
        w.commit(metadata={"kind": "delta"})
    r = CheckpointReader(tmp_path / "out")
    assert torch.equal(r.get("a"), a) and torch.equal(r.get("b"), b)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_add_bytes_refuses_too_many_too_few_or_out_of_order(tmp_path):
    with CheckpointWriter(tmp_path / "o1") as w:
        w.plan([TensorInfo("a", (2,), "F32"), TensorInfo("b", (1,), "F32")])
        with pytest.raises(CheckpointError, match="out of the planned order"):
            w.add_bytes("b", b"\0" * 4, final=True)
        with pytest.raises(CheckpointError, match="more than its planned 8 bytes"):
            w.add_bytes("a", b"\0" * 12, final=False)
    with CheckpointWriter(tmp_path / "o2") as w:
        w.plan([TensorInfo("a", (2,), "F32")])
        with pytest.raises(CheckpointError, match="written with 4 bytes, planned 8"):
            w.add_bytes("a", b"\0" * 4, final=True)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
