"""The engine's contracts: inputs must be delta sources, stages run in one bounded pipeline, and the
chunked forms of whole-tensor methods agree with the whole ones."""

from __future__ import annotations

import threading

import pytest
import torch
from engine_helpers import tiny_set

from fedmerge.checkpoints.compat import CompatibilityCheck
from fedmerge.checkpoints.pipeline import Stage, run_pipeline
from fedmerge.merging.engine import MergeSpec, merge
from fedmerge.merging.source import NotADeltaSource, require_delta_source
from fedmerge.merging.strategies import TensorContext, build_strategy
from fedmerge.merging.strategies.base import merge_in_memory
from fedmerge.merging.strategies.spectral import GramTensor
from fedmerge.merging.strategies.sparsify import GeneralizedMerge, ModelPlan
from fedmerge.merging.taskvector import TaskVector


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_set(tmp_path_factory, n=2)


# -- the DeltaSource contract ------------------------------------------------------------------------
class _NoDelta:
    label = "half-done"

    def names(self):
        return []


class _OldStyle:
    """The four members of the old contract, get_delta without rows= and base=."""

    label = "old"
    kind, complete, folder, config = "custom", False, None, {}

    def __init__(self, tv):
        self.tv = tv

    def names(self):
        return self.tv.names()

    def info(self, name):
        return self.tv.info(name)

    def file_of(self, name):
        return self.tv.file_of(name)

    def get_delta(self, name):
        return self.tv.get_delta(name)

    def weight(self, name, reference):
        return reference

    def describe(self):
        return {}

    def record_digests(self, enabled):
        pass


def test_an_input_missing_members_is_refused_naming_it_and_them(tiny, tmp_path):
    base, fts = tiny
    with pytest.raises(NotADeltaSource, match=r"merge input #1 \(half-done\): _NoDelta is not a delta source; it lacks kind, complete, folder, config, info, file_of, get_delta"):
        merge(base, [fts[0], _NoDelta()], tmp_path / "out", MergeSpec(method="task_arithmetic", device="cpu"), progress=False)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_a_get_delta_without_rows_and_base_is_refused(tiny, tmp_path):
    base, fts = tiny
    with pytest.raises(NotADeltaSource, match=r"merge input #1 \(old\): _OldStyle.get_delta does not take rows=, base="):
        merge(base, [fts[0], _OldStyle(TaskVector(fts[1], base))], tmp_path / "out", MergeSpec(method="task_arithmetic", device="cpu"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_built_in_sources_meet_the_contract(tiny):
    base, fts = tiny
    tv = TaskVector(fts[0], base)
    assert require_delta_source(tv, "x") is tv and tv.complete and tv.kind == "model"
    with pytest.raises(NotADeltaSource, match="lacks label"):
        require_delta_source(object(), "input #0")


# -- the pipeline primitive --------------------------------------------------------------------------
def test_stages_keep_the_order_and_a_single_worker_stage_sees_items_one_by_one():
    seen: list[int] = []
    active = []
    lock = threading.Lock()

    def first(item, value):
        with lock:
            active.append(item)
            assert len(active) == 1  # one worker: never two items at once
        seen.append(item)
        with lock:
            active.remove(item)
        return item * 10

    out = []
    run_pipeline(range(40), [Stage(first, 1), Stage(lambda item, v: v + item, 3)], lambda item, v: out.append((item, v)), depth=3)
    assert seen == list(range(40)) and out == [(i, 11 * i) for i in range(40)]


def test_a_failing_stage_stops_the_later_items_and_its_error_is_raised():
    computed = []

    def compute(item, value):
        if item == 5:
            raise ValueError("item 5 broke")
        computed.append(item)
        return value

    written = []
    with pytest.raises(ValueError, match="item 5 broke"):
        run_pipeline(range(100), [Stage(lambda i, v: v, 1), Stage(compute, 1)], lambda i, v: written.append(i), depth=2)
    assert computed == [0, 1, 2, 3, 4] and written == [0, 1, 2, 3, 4]


# -- chunked whole-tensor methods --------------------------------------------------------------------
def _ctx(strategy):
    return TensorContext(name="model.layers.0.mlp.up_proj.weight", model_params=strategy.model_params, seed=3)


@pytest.mark.parametrize("variant", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_rank_based_sparsification_is_the_same_in_many_chunks(variant):
    """Magnitude ranks are exact whatever the chunking, ties at the boundaries included."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(300, 70, generator=g)
    # bf16-rounded deltas tie heavily: the rank boundaries fall inside runs of equal magnitudes
    ds = [(torch.randn(300, 70, generator=g) * 0.01).bfloat16().float() for _ in range(3)]
    kw = dict(sparsification="magnitude" if variant == "ties" else "outliers", consensus="sum" if variant != "breadcrumbs" else None,
              normalize=True, rescale=False, rescale_mode="probability", lambda_=0.9)  # fmt: skip
    plans = [ModelPlan(1.0, 0.3, gamma=0.05), ModelPlan(0.5, 0.6, gamma=0.05), ModelPlan(0.8, 0.45, gamma=0.05)]
    s = build_strategy("ties", {}, [{}] * 3)
    whole = merge_in_memory(GeneralizedMerge(_ctx(s), base.shape, base.dtype, "cpu", plans, [True] * 3, **kw), base, ds)
    many = GeneralizedMerge(_ctx(s), base.shape, base.dtype, "cpu", plans, [True] * 3, chunk=997, **kw)
    assert len(many.chunks) == 22
    assert torch.equal(merge_in_memory(many, base, ds), whole)


def _deltas(m, n, t, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if rank:
        return [torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) * 0.01 for _ in range(t)]
    return [torch.randn(m, n, generator=g) * 0.01 * (1 + i) for i in range(t)]


@pytest.mark.parametrize("method,params", [("iso_c", {"alpha": 0.7}), ("tsv_m", {}), ("iso_cts", {"common_space_fraction": 0.6})])
@pytest.mark.parametrize("tasks,rank", [(2, None), (3, None), (3, 4)])
def test_large_matrices_through_gram_matrices_match_the_direct_svd(method, params, tasks, rank):
    """A tall matrix merged from its tasks' Gram matrices, fed in many row chunks, equals the
    paper's definition by direct SVD within float tolerance (rank-deficient tasks included)."""
    strategy = build_strategy(method, params, [{"weight": 1.0 - 0.2 * i} for i in range(tasks)])
    base = torch.randn(260, 48, generator=torch.Generator().manual_seed(9))
    ds = _deltas(260, 48, tasks, rank)
    ctx = _ctx(strategy)
    direct = strategy.merge_tensor(ctx, base, ds)  # a small matrix: decomposed directly
    weights = [mp.weight for mp in strategy.model_params]
    chunked = GramTensor(strategy, base.shape, weights, [True] * tasks, "cpu", chunk=48 * 7)
    assert len(chunked.chunks) == 38
    got = merge_in_memory(chunked, base, ds)
    update = (direct - base).abs().max()
    assert update > 0
    torch.testing.assert_close(got, direct, rtol=0, atol=float(update) * 1e-4)


def test_compatibility_relaxes_only_the_keys_asked():
    base = {"model_type": "mistral", "num_hidden_layers": 4, "vocab_size": 300, "hidden_size": 16}
    other = {**base, "num_hidden_layers": 8, "vocab_size": 320}
    check = CompatibilityCheck({}, config=base)
    assert [k for k, _, _ in check.compare({}, complete=False, config=other).architecture] == ["num_hidden_layers", "vocab_size"]
    assert [k for k, _, _ in check.compare({}, complete=False, config=other, relaxed={"num_hidden_layers"}).architecture] == ["vocab_size"]
    assert check.compare({}, complete=False, config=other, relaxed={"num_hidden_layers", "vocab_size"}).ok
