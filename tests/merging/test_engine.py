"""The streaming engine: same numbers as a plain in-memory merge, reproducible, atomic, checked first."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from engine_helpers import tensors, tiny_set

from fedmerge.checkpoints import CheckpointReader, IncompatibleCheckpoint
from fedmerge.merging.engine import MergeSpec, MissingBase, NonFiniteTensor, merge
from fedmerge.merging.strategies import StrategyError, TensorContext, available, build_strategy
from fedmerge.merging.source import DeltaSource
from fedmerge.merging.taskvector import TaskVector, write_delta_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_set(tmp_path_factory, n=3)


def _digest(folder) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def _in_memory(method, params, base_dir, model_dirs, seed=0):
    """The merge done the obvious way: whole tensors in memory, one strategy call per group."""
    strategy = build_strategy(method, params, [{}] * len(model_dirs))
    b = tensors(base_dir)
    ms = [tensors(m) for m in model_dirs]
    cfg = CheckpointReader(base_dir).config
    out = {}
    for group in strategy.groups(list(b), cfg):
        ctxs = [TensorContext(name=n, model_params=strategy.model_params, seed=seed, device="cpu", config=cfg) for n in group]
        bases = [b[n].float() for n in group]
        deltas = [[m[n].float() - b[n].float() for m in ms] for n in group]
        merged = strategy.merge_group(ctxs, bases, deltas) if len(group) > 1 else [strategy.merge_tensor(ctxs[0], bases[0], deltas[0])]
        out.update({n: t.to(b[n].dtype) for n, t in zip(group, merged)})
    return out


def test_task_arithmetic_n3_equals_in_memory_with_and_without_chunks(tiny, tmp_path):
    base, fts = tiny
    params = {"lambda": 0.8}
    spec = MergeSpec(method="task_arithmetic", parameters=params, model_parameters=[{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}], device="cpu")
    whole = merge(base, fts, tmp_path / "whole", spec, progress=False)
    chunked = merge(base, fts, tmp_path / "chunked", spec.model_copy(update={"chunk_elements": 1024, "max_shard_bytes": 50_000}), progress=False)
    assert whole.tensors == chunked.tensors == len(CheckpointReader(base).names())
    assert len(list((tmp_path / "chunked").glob("model-*.safetensors"))) > 2
    b, ms = tensors(base), [tensors(f) for f in fts]
    got_w, got_c = tensors(tmp_path / "whole"), tensors(tmp_path / "chunked")
    for n, bt in b.items():
        exp = bt.float().clone()
        for w, m in zip((0.5, 0.3, 0.2), ms):
            exp.add_(m[n].float() - bt.float(), alpha=w * 0.8)
        assert torch.equal(got_w[n], exp) and torch.equal(got_c[n], exp), n


def test_every_strategy_streams_to_the_same_bytes_as_whole_tensors(tiny, tmp_path):
    base, fts = tiny
    for name, entry in available().items():
        cls = entry.cls
        n = min(3, cls.max_models or 3)
        fields = set(cls.Params.model_fields) | set(cls.PerModel.model_fields)
        params = {k: v for k, v in {"density": 0.6, "t": 0.3}.items() if k in fields}
        spec = MergeSpec(method=name, parameters=params, seed=11, device="cpu", chunk_elements=1024)
        out = tmp_path / name
        merge(base, fts[:n], out, spec, progress=False)
        expected = _in_memory(name, params, base, fts[:n], seed=11)
        got = tensors(out)
        assert set(got) == set(expected), name
        for t in got:
            assert torch.equal(got[t], expected[t]), f"{name}: {t}"
        meta = json.loads((out / "fedmerge.json").read_text())
        assert meta["method"] == name and meta["seed"] == 11 and len(meta["inputs"]) == n


def test_same_seed_same_bytes_and_delta_folders_match_model_folders(tiny, tmp_path):
    base, fts = tiny
    spec = MergeSpec(method="dare_ties", parameters={"density": 0.5}, seed=3, device="cpu")
    a = merge(base, fts, tmp_path / "a", spec, progress=False)
    b = merge(base, fts, tmp_path / "b", spec.model_copy(update={"chunk_elements": 1024}), progress=False)
    c = merge(base, fts, tmp_path / "c", spec.model_copy(update={"seed": 4}), progress=False)
    assert _digest(a.out_dir) == _digest(b.out_dir) != _digest(c.out_dir)
    # the federation path: deltas spooled as float32 delta folders give the very same bytes
    deltas = [write_delta_checkpoint(TaskVector(f, base), tmp_path / f"delta{i}") for i, f in enumerate(fts)]
    d = merge(base, deltas, tmp_path / "d", spec, progress=False)
    assert _digest(d.out_dir) == _digest(a.out_dir)
    meta = json.loads((a.out_dir / "fedmerge.json").read_text())
    from fedmerge.checkpoints import model_fingerprint

    assert meta["base"]["fingerprint"] == model_fingerprint(CheckpointReader(base))
    assert [i["fingerprint"] for i in meta["inputs"]] == [model_fingerprint(CheckpointReader(f)) for f in fts]
    assert meta["parameters"] == {"density": 0.5} and meta["fedmerge_version"]


def test_linear_without_base_is_the_mean(tiny, tmp_path):
    base, fts = tiny
    merge(None, fts, tmp_path / "soup", MergeSpec(method="linear", device="cpu"), progress=False)
    got = tensors(tmp_path / "soup")
    ms = [tensors(f) for f in fts]
    for n in got:
        torch.testing.assert_close(got[n], (ms[0][n] + ms[1][n] + ms[2][n]) / 3, rtol=0, atol=1e-6)
    with pytest.raises(MissingBase, match="'ties' is defined relative to a base model"):
        merge(None, fts, tmp_path / "x", MergeSpec(method="ties"), progress=False)


def test_out_dtype(tiny, tmp_path):
    base, fts = tiny
    merge(base, fts[:2], tmp_path / "bf16", MergeSpec(method="task_arithmetic", out_dtype="bf16", device="cpu"), progress=False)
    r = CheckpointReader(tmp_path / "bf16")
    assert {r.info(n).dtype for n in r.names()} == {"BF16"}
    assert (tmp_path / "bf16" / "tokenizer.json").exists() and (tmp_path / "bf16" / "config.json").exists()
    # the config says what is on disk, so transformers' dtype="auto" loads bfloat16, not float32
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    merge(base, fts[:2], tmp_path / "f32", MergeSpec(method="task_arithmetic", device="cpu"), progress=False)
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"


def test_failure_mid_merge_leaves_nothing(tiny, tmp_path, monkeypatch):
    base, fts = tiny
    from fedmerge.merging.strategies.linear import TaskArithmetic

    calls = {"n": 0}
    real = TaskArithmetic.merge_tensor

    def flaky(self, ctx, b, deltas):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("strategy exploded")
        return real(self, ctx, b, deltas)

    monkeypatch.setattr(TaskArithmetic, "merge_tensor", flaky)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="strategy exploded"):
        merge(base, fts, out, MergeSpec(method="task_arithmetic", max_shard_bytes=20_000, device="cpu"), progress=False)
    assert calls["n"] == 6
    assert list(tmp_path.iterdir()) == []


def test_non_finite_input_is_named(tiny, tmp_path):
    base, fts = tiny
    bad = tmp_path / "bad"
    shutil.copytree(fts[1], bad)
    from fedmerge.checkpoints import CheckpointWriter

    t = tensors(fts[1])
    t["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    with CheckpointWriter(bad, overwrite=True) as w:
        for n, v in t.items():
            w.add(n, v)
        w.commit(sidecars_from=fts[1])
    with pytest.raises(NonFiniteTensor, match="input bad .*tensor 'model.layers.1.mlp.up_proj.weight' holds NaN"):
        merge(base, [fts[0], bad], tmp_path / "out", MergeSpec(method="task_arithmetic", device="cpu"), progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def _variant(src, dst, edit_config=None, edit_tensors=None, edit_tokenizer=None):
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_tokenizer:
        tok = json.loads((dst / "tokenizer.json").read_text())
        edit_tokenizer(tok)
        (dst / "tokenizer.json").write_text(json.dumps(tok))
    if edit_tensors:
        from fedmerge.checkpoints import CheckpointWriter

        t = tensors(src)
        edit_tensors(t)
        with CheckpointWriter(dst, overwrite=True) as w:
            for n, v in t.items():
                w.add(n, v)
            w.commit(sidecars_from=dst if (dst / "config.json").exists() else src)
    return dst


def test_preflight_refuses_incompatible_inputs_before_writing(tiny, tmp_path):
    base, fts = tiny
    spec = MergeSpec(method="task_arithmetic", device="cpu")
    cases = [
        (_variant(fts[0], tmp_path / "heads", edit_config=lambda c: c.update(num_attention_heads=8)), "config.json num_attention_heads=8 but the base .* has 4"),
        (_variant(fts[0], tmp_path / "shape", edit_tensors=lambda t: t.update({"model.norm.weight": torch.ones(33)})), "tensor 'model.norm.weight' has shape \\[33\\], the base has \\[32\\]"),
        (_variant(fts[0], tmp_path / "missing", edit_tensors=lambda t: t.pop("lm_head.weight")), "has no tensor 'lm_head.weight' that the base has"),
        (_variant(fts[0], tmp_path / "extra", edit_tensors=lambda t: t.update({"extra.weight": torch.ones(2)})), "tensor 'extra.weight' is not in the base"),
        (_variant(fts[0], tmp_path / "tok", edit_tokenizer=lambda t: t["model"]["vocab"].update({"zzz-new": 9999})), "tokenizer.json differs from the base's"),
    ]
    for bad, message in cases:
        with pytest.raises(IncompatibleCheckpoint, match=message):
            merge(base, [fts[1], bad], tmp_path / "out", spec, progress=False)
        assert not (tmp_path / "out").exists()
    with pytest.raises(StrategyError, match="slerp is defined for at most 2 models, got 3"):
        merge(base, fts, tmp_path / "out", MergeSpec(method="slerp"), progress=False)
    with pytest.raises(StrategyError, match="models\\[1\\].parameters.density"):
        merge(base, fts[:2], tmp_path / "out", MergeSpec(method="ties", model_parameters=[{}, {"density": 2}]), progress=False)
    assert list(tmp_path.glob(".out*")) == []


class _ThirdPartySource(DeltaSource):
    """A delta source written outside fedmerge: the contract's members, the defaults inherited."""

    kind = "custom"
    complete = False
    config: dict = {}

    def __init__(self, model, base):
        self._tv = TaskVector(model, base)
        self.label = "plain"
        self.folder = None

    def names(self):
        return self._tv.names()

    def info(self, name):
        return self._tv.info(name)

    def file_of(self, name):
        return self._tv.file_of(name)

    def get_delta(self, name, *, rows=None, base=None):
        return self._tv.get_delta(name, rows=rows, base=base)


def test_a_delta_source_from_elsewhere_merges_like_a_built_in_one(tiny, tmp_path):
    base, fts = tiny
    spec = MergeSpec(method="task_arithmetic", device="cpu", chunk_elements=1024)
    merge(base, fts[:2], tmp_path / "a", spec, progress=False)
    merge(base, [fts[0], _ThirdPartySource(fts[1], base)], tmp_path / "b", spec, progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "fedmerge.json").read_text())
    assert meta["inputs"][1] == {"label": "plain", "kind": "custom", "path": None, "fingerprint": None}


def test_merge_layout_per_tensor_parameters_and_scaled_copies(tiny, tmp_path):
    """The library's layout path: two parameter sets, a tensor taken from another tensor of the
    inputs, and a scaled copy of the reference, each as the layout says."""
    from fedmerge.merging.engine import merge_layout
    from fedmerge.merging.layout import MergeLayout, OutputTensor, ParameterTable

    base, fts = tiny
    b = CheckpointReader(base)
    sources = [TaskVector(f, b) for f in fts[:2]]
    table = ParameterTable()
    low = table.add({"lambda": 0.5}, [{"weight": 1.0}, {"weight": 0.0}])
    high = table.add({"lambda": 2.0}, [{"weight": 0.5}, {"weight": 0.5}])
    assert table.add({"lambda": 0.5}, [{"weight": 1.0}, {"weight": 0.0}]) == low  # equal sets share one index
    q0, q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    tensors_out = []
    for n in b.names():
        if n == "model.norm.weight":
            tensors_out.append(OutputTensor(n, 0, n, params=None, scale=0.25))
        elif n == q1:  # layer 1's query from the inputs' layer 0, against the base's layer 0
            tensors_out.append(OutputTensor(n, 0, q0, ((0, q0), (1, q0)), high))
        else:
            tensors_out.append(OutputTensor(n, 0, n, ((0, n), (1, n)), low if ".layers.0." in n else high))
    layout = MergeLayout([b], tensors_out, table.sets)
    merge_layout(layout, sources, tmp_path / "out", MergeSpec(method="task_arithmetic", device="cpu"), progress=False)
    got, bt, m1, m2 = tensors(tmp_path / "out"), tensors(base), tensors(fts[0]), tensors(fts[1])
    for n in bt:
        if n == "model.norm.weight":
            expected = 0.25 * bt[n]
        elif n == q1:
            expected = bt[q0] + 2.0 * (0.5 * (m1[q0] - bt[q0]) + 0.5 * (m2[q0] - bt[q0]))
        elif ".layers.0." in n:
            expected = bt[n] + 0.5 * (m1[n] - bt[n])
        else:
            expected = bt[n] + 2.0 * (0.5 * (m1[n] - bt[n]) + 0.5 * (m2[n] - bt[n]))
        torch.testing.assert_close(got[n], expected, rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("read_workers", [1, 2])
def test_non_finite_base_is_named_as_the_reference(tiny, tmp_path, read_workers):
    # Every input's delta is then non-finite too (model - NaN); the reference is what is named,
    # whether the deltas are computed inline or by the loader threads meanwhile.
    base, fts = tiny
    bad = tmp_path / "badbase"
    shutil.copytree(base, bad)
    from fedmerge.checkpoints import CheckpointWriter

    t = tensors(base)
    t["model.layers.0.self_attn.q_proj.weight"][0, 1] = float("inf")
    with CheckpointWriter(bad, overwrite=True) as w:
        for n, v in t.items():
            w.add(n, v)
        w.commit(sidecars_from=base)
    spec = MergeSpec(method="task_arithmetic", device="cpu", read_workers=read_workers)
    with pytest.raises(NonFiniteTensor, match="reference .*badbase.*tensor 'model.layers.0.self_attn.q_proj.weight' holds NaN or infinite"):
        merge(bad, fts, tmp_path / "out", spec, progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_objects_alive_before_a_merge_are_frozen_only_during_it(tiny, tmp_path, monkeypatch):
    import gc

    from fedmerge.merging.strategies.linear import TaskArithmetic

    seen = []
    real = TaskArithmetic.merge_tensor

    def watching(self, ctx, base, deltas):
        seen.append(gc.get_freeze_count())
        return real(self, ctx, base, deltas)

    monkeypatch.setattr(TaskArithmetic, "merge_tensor", watching)
    base, fts = tiny
    before = gc.get_freeze_count()
    merge(base, fts, tmp_path / "out", MergeSpec(method="task_arithmetic", device="cpu"), progress=False)
    assert seen and min(seen) > before + 1000  # the imported world is out of the collector's way
    assert gc.get_freeze_count() == before


def test_free_memory_is_looked_at_once_per_check_interval():
    from fedmerge.merging.engine import _FreedMemory

    class Allocator:  # stands in for glibc: 300 bytes in use, counts the trims asked for
        trims = 0

        def mallinfo2(self):
            return types.SimpleNamespace(uordblks=300, hblkhd=0)

        def malloc_trim(self, pad):
            Allocator.trims += 1

    import types

    freed = _FreedMemory(limit=500, check_every=100)
    freed._libc, freed._outside = Allocator(), 0
    looks = []
    resident = {"bytes": 1000}  # 700 bytes free: above the limit
    freed._resident = lambda: looks.append(1) or resident["bytes"]
    for _ in range(9):
        freed.settle(10)
    assert looks == [] and Allocator.trims == 0
    freed.settle(10)  # 100 bytes released since the last look
    assert len(looks) == 1 and Allocator.trims == 1
    freed.settle(99)
    assert len(looks) == 1
    resident["bytes"] = 700  # 400 free: under the limit, nothing to trim
    freed.settle(1)
    assert len(looks) == 2 and Allocator.trims == 1


def _as_bf16(src, dst):
    from fedmerge.checkpoints import CheckpointWriter

    if dst.exists():
        return dst
    with CheckpointWriter(dst) as w:
        for n, v in tensors(src).items():
            w.add(n, v.to(torch.bfloat16) if v.is_floating_point() else v)
        w.commit(sidecars_from=src)
    return dst


@pytest.mark.parametrize("dtype,compute", [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")])
@pytest.mark.parametrize(
    "method,params",
    [("task_arithmetic", {}), ("ties", {"density": 0.4}), ("dare_ties", {"density": 0.5}), ("breadcrumbs", {"density": 0.8, "gamma": 0.05}), ("model_stock", {}), ("hierarchical", {})],
)
def test_reused_buffers_change_no_byte_of_the_result(tiny, tmp_path_factory, method, params, dtype, compute, caplog):
    import logging

    base, fts = tiny
    if dtype == "bfloat16":  # the inputs are widened into reused float32 buffers
        root = tmp_path_factory.mktemp("bf16")
        base, fts = _as_bf16(base, root / "base"), [_as_bf16(f, root / f.name) for f in fts]
    out = tmp_path_factory.mktemp("reuse")
    results = {}
    for reuse in (0, 1):  # 0: never; 1: every whole tensor goes through the pool
        spec = MergeSpec(method=method, model_parameters=[params] * len(fts), device="cpu", dtype=compute, reuse_buffers_from=reuse)
        with caplog.at_level(logging.DEBUG, logger="fedmerge.merging.engine"):
            caplog.clear()
            merge(base, fts, out / f"r{reuse}", spec, progress=False)
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("buffers:")]
        results[reuse] = (tensors(out / f"r{reuse}"), lines)
    plain, pooled = results[0][0], results[1][0]
    assert plain.keys() == pooled.keys()
    for n in plain:
        assert torch.equal(plain[n], pooled[n]), n
    assert results[0][1] == []  # no pool at all
    (line,) = results[1][1]
    allocated, reused = (int(w) for w in line.replace(",", "").split() if w.isdigit())
    assert allocated > 0 and reused > 0  # the layers' repeating shapes were served again


@pytest.mark.parametrize("method", ["iso_c", "della"])
def test_methods_whose_own_memory_sets_the_peak_hold_no_idle_buffers(tiny, tmp_path, caplog, method):
    # Decompositions (spectral methods) or per-row rankings (DELLA) set their peak memory;
    # buffers waiting for reuse would only add to it.
    import logging

    base, fts = tiny
    with caplog.at_level(logging.DEBUG, logger="fedmerge.merging.engine"):
        merge(base, fts, tmp_path / "iso", MergeSpec(method=method, device="cpu", reuse_buffers_from=1), progress=False)
        assert not [r for r in caplog.records if r.getMessage().startswith("buffers:")]
        merge(base, fts, tmp_path / "ta", MergeSpec(method="task_arithmetic", device="cpu", reuse_buffers_from=1), progress=False)
        assert [r for r in caplog.records if r.getMessage().startswith("buffers:")]
