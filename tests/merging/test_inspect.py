"""The inspect report: figures checked on task vectors built to have known cosines and conflicts."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import SPEC, tensors, tiny_set

from fedmerge.checkpoints import CheckpointWriter
from fedmerge.merging.inspect import format_report, inspect_models, layer_of


def _write(folder, ts, sidecars):
    with CheckpointWriter(folder) as w:
        for n, t in ts.items():
            w.add(n, t)
        w.commit(sidecars_from=sidecars)
    return folder


def _permute_layer0_heads(ts):
    """Swap the two KV heads of layer 0 together with their query groups: same function."""
    hd = SPEC.hidden_size // SPEC.num_attention_heads
    p = "model.layers.0.self_attn."
    q_order, kv_order = [2, 3, 0, 1], [1, 0]
    out = dict(ts)
    out[p + "q_proj.weight"] = ts[p + "q_proj.weight"].reshape(4, hd, -1)[q_order].reshape(4 * hd, -1)
    out[p + "k_proj.weight"] = ts[p + "k_proj.weight"].reshape(2, hd, -1)[kv_order].reshape(2 * hd, -1)
    out[p + "v_proj.weight"] = ts[p + "v_proj.weight"].reshape(2, hd, -1)[kv_order].reshape(2 * hd, -1)
    out[p + "o_proj.weight"] = ts[p + "o_proj.weight"].reshape(-1, 4, hd)[:, q_order].reshape(-1, 4 * hd)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base, _ = tiny_set(tmp_path_factory)
    root = tmp_path_factory.mktemp("inspect")
    b = tensors(base)
    gen = torch.Generator().manual_seed(5)
    d = {n: torch.randn(t.shape, generator=gen) * 0.05 + 0.01 * torch.sign(torch.randn(t.shape, generator=gen)) for n, t in b.items()}
    plus = _write(root / "plus", {n: b[n] + d[n] for n in b}, base)
    minus = _write(root / "minus", {n: b[n] - d[n] for n in b}, base)
    double = _write(root / "double", {n: b[n] + 2 * d[n] for n in b}, base)
    perm = _write(root / "perm", _permute_layer0_heads({n: b[n] + 2 * d[n] for n in b}), base)
    return base, plus, minus, double, perm


def test_cosine_norms_and_sign_conflict(built):
    base, plus, minus, double, _ = built
    rep = inspect_models(base, [plus, minus, double], progress=False, chunk_elements=1024, alignment=False)
    assert rep["compatible"] and [r["label"] for r in rep["inputs"]] == ["plus", "minus", "double"]
    rows = {r["layer"]: r for r in rep["layers"]}
    assert set(rows) == {"embed", "layer 0", "layer 1", "norm", "head"}
    for r in rep["layers"]:
        assert r["cosine"]["plus~minus"] == pytest.approx(-1.0, abs=1e-5)
        assert r["cosine"]["plus~double"] == pytest.approx(1.0, abs=1e-5)
        assert r["delta_norm"]["double"] == pytest.approx(2 * r["delta_norm"]["plus"], rel=1e-5)
        assert r["delta_norm"]["minus"] == pytest.approx(r["delta_norm"]["plus"], rel=1e-5)
        assert r["sign_conflict"] == pytest.approx(1.0)  # plus and minus disagree everywhere
    agree = inspect_models(base, [plus, double], progress=False, alignment=False)
    assert all(r["sign_conflict"] == 0.0 for r in agree["layers"])
    assert sum(r["params"] for r in agree["layers"]) == sum(t.numel() for t in tensors(base).values())
    text = format_report(agree)
    assert "layer 0" in text and "cos plus~double" in text


def test_head_alignment_column(built):
    base, plus, _, double, perm = built
    rep = inspect_models(base, [plus, double, perm], progress=False)
    al = rep["alignment"]
    assert al["available"] and al["reference"] == "plus"
    by_layer = {b["layer"]: b["inputs"] for b in al["blocks"]}
    assert by_layer[0]["double"]["heads_moved"] == 0.0
    assert by_layer[0]["perm"]["heads_moved"] == 1.0 and by_layer[0]["perm"]["kv_heads_moved"] == 1.0
    assert by_layer[0]["perm"]["cost_aligned"] < by_layer[0]["perm"]["cost_identity"]
    assert by_layer[1]["perm"]["heads_moved"] == 0.0
    assert "head alignment to plus" in format_report(rep)


def test_incompatible_inputs_are_reported_not_raised(built, tmp_path):
    base, plus, *_ = built
    ts = tensors(plus)
    ts["model.norm.weight"] = torch.ones(40)
    del ts["lm_head.weight"]
    bad = _write(tmp_path / "bad", ts, base)
    rep = inspect_models(base, [plus, bad], progress=False)
    assert not rep["compatible"] and rep["layers"] == []
    problems = rep["inputs"][1]["problems"]
    assert rep["inputs"][1]["shapes"] == "different" and rep["inputs"][1]["names"] == "different"
    assert any("'lm_head.weight'" in p for p in problems) and any("'model.norm.weight' [40] vs [32]" in p for p in problems)
    assert "INCOMPATIBLE" in format_report(rep)


def test_layer_of():
    assert layer_of("model.layers.12.mlp.up_proj.weight") == "layer 12"
    assert layer_of("model.embed_tokens.weight") == "embed"
    assert layer_of("lm_head.weight") == "head"
    assert layer_of("model.norm.weight") == "norm"


def test_non_finite_weights_are_counted_and_make_inspect_fail(built, tmp_path, capsys):
    from fedmerge.cli import main

    base, plus, *_ = built
    ts = tensors(plus)
    ts["model.layers.1.mlp.up_proj.weight"][0, :3] = float("nan")
    ts["lm_head.weight"][2, 2] = float("inf")
    bad = _write(tmp_path / "bad", ts, base)
    rep = inspect_models(base, [plus, bad], progress=False, chunk_elements=256, alignment=False)
    assert not rep["compatible"] and rep["base_non_finite"] == 0
    assert [r["non_finite"] for r in rep["inputs"]] == [0, 4]
    assert rep["inputs"][0]["compatible"] and not rep["inputs"][1]["compatible"]
    assert any(p.startswith("4 NaN/infinite value(s), e.g. in tensor ") for p in rep["inputs"][1]["problems"])
    assert main(["inspect", str(base), str(plus), str(bad), "--no-alignment", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "bad [model] INCOMPATIBLE" in out and "non-finite 4" in out and "not mergeable" in out
    # a non-finite base is reported once, as the base's, not again for every input
    bad_base = _write(tmp_path / "bad-base", {**tensors(base), "model.norm.weight": torch.full((SPEC.hidden_size,), float("nan"))}, base)
    rep = inspect_models(bad_base, [plus], progress=False, alignment=False)
    assert rep["base_non_finite"] == SPEC.hidden_size and rep["inputs"][0]["non_finite"] == 0 and not rep["compatible"]
