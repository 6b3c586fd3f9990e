"""LoRA adapters as deltas: equal to what PEFT's merge_and_unload() writes into the weights."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import SPEC, tensors, tiny_set

from fedmerge.checkpoints import CheckpointReader, IncompatibleCheckpoint
from fedmerge.merging.lora import LoraDelta, LoraError, pattern_value
from fedmerge.merging.taskvector import open_delta_source


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_set(tmp_path_factory)


def _peft_lora(base_dir, out_root, **cfg):
    """Train-free LoRA with non-zero B (init_lora_weights=False), saved; returns (adapter, merged)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **cfg))
    adapter = out_root / "adapter"
    peft_model.save_pretrained(adapter)
    merged = out_root / "merged"
    peft_model.merge_and_unload().save_pretrained(merged, safe_serialization=True)
    return adapter, merged


def _assert_lora_equals_dense(adapter, merged, base_dir):
    base = CheckpointReader(base_dir)
    lora = open_delta_source(adapter, base)
    assert isinstance(lora, LoraDelta)
    b, m = tensors(base_dir), tensors(merged)
    touched = set(lora.names())
    assert touched
    for n in base.names():
        dense = m[n].float() - b[n].float()
        d = lora.get_delta(n)
        if n in touched:
            torch.testing.assert_close(d, dense, rtol=1e-5, atol=1e-6)
            assert dense.abs().max() > 1e-4
            rows = (1, min(4, d.shape[0]))
            torch.testing.assert_close(lora.get_delta(n, rows=rows), d[rows[0] : rows[1]], rtol=1e-6, atol=1e-7)
        else:
            assert d is None and torch.equal(dense, torch.zeros_like(dense)), n
    return lora


def test_lora_with_rank_and_alpha_patterns_and_embedding(tiny, tmp_path):
    base, _ = tiny
    adapter, merged = _peft_lora(
        base,
        tmp_path,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 3},
    )
    lora = _assert_lora_equals_dense(adapter, merged, base)
    # the patterns were honoured, not just absorbed by the comparison
    assert lora.scaling("model.layers.1.self_attn.q_proj.weight") == pytest.approx(8 / 2)
    assert lora.scaling("model.layers.0.self_attn.q_proj.weight") == pytest.approx(8 / 4)
    assert lora.scaling("model.layers.0.mlp.down_proj.weight") == pytest.approx(8 / 6)
    assert lora.scaling("model.layers.0.self_attn.v_proj.weight") == pytest.approx(3 / 4)
    assert "model.embed_tokens.weight" in lora.names()


def test_rslora_scaling(tiny, tmp_path):
    base, _ = tiny
    adapter, merged = _peft_lora(base, tmp_path, r=4, lora_alpha=6, use_rslora=True, target_modules=["k_proj", "up_proj"])
    lora = _assert_lora_equals_dense(adapter, merged, base)
    assert lora.scaling("model.layers.0.self_attn.k_proj.weight") == pytest.approx(6 / 2)


def test_fan_in_fan_out_conv1d(tmp_path):
    """GPT-2 stores its projections as (in, out): the delta is transposed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=24, n_layer=1, n_head=2)).save_pretrained(base, safe_serialization=True)
    adapter, merged = _peft_lora(base, tmp_path, r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    lora = _assert_lora_equals_dense(adapter, merged, base)
    assert CheckpointReader(base).info("transformer.h.0.attn.c_attn.weight").shape == (24, 72)
    assert lora.get_delta("transformer.h.0.attn.c_attn.weight").shape == (24, 72)


def test_pattern_matching_follows_peft():
    patterns = {"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 5}
    assert pattern_value(patterns, "model.layers.0.self_attn.q_proj", 8) == 2
    assert pattern_value(patterns, "model.layers.1.self_attn.v_proj", 8) == 5
    assert pattern_value(patterns, "model.layers.0.self_attn.v_proj", 8) == 8
    assert pattern_value(patterns, "model.layers.0.self_attn.xq_proj", 8) == 8  # only on a dot boundary


def test_dora_and_missing_weights_refused(tiny, tmp_path):
    base, _ = tiny
    adapter, _ = _peft_lora(base, tmp_path, r=2, lora_alpha=2, target_modules=["q_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(LoraError, match="DoRA"):
        LoraDelta(adapter, CheckpointReader(base))
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(LoraError, match="no adapter_model.safetensors .*adapter_model.bin.*never unpickles"):
        LoraDelta(adapter, CheckpointReader(base))


def test_adapter_for_another_model_is_refused(tiny, tmp_path):
    base, _ = tiny
    adapter, _ = _peft_lora(base, tmp_path, r=2, lora_alpha=2, target_modules=["q_proj"])
    from fedmerge.checkpoints import CheckpointWriter

    other = tmp_path / "other"
    with CheckpointWriter(other) as w:
        w.add("model.layers.0.self_attn.q_proj.weight", torch.zeros(SPEC.hidden_size + 2, SPEC.hidden_size))
        w.commit()
    with pytest.raises(IncompatibleCheckpoint, match="'model.layers.0.self_attn.q_proj' gives a 32x32 delta but base tensor 'model.layers.0.self_attn.q_proj.weight' .* is \\[34, 32\\]"):
        LoraDelta(adapter, CheckpointReader(other))
    with CheckpointWriter(tmp_path / "other2") as w:
        w.add("model.layers.0.self_attn.q_proj.weight", torch.zeros(SPEC.hidden_size, SPEC.hidden_size))
        w.commit()
    with pytest.raises(LoraError, match="no tensor 'model.layers.1.self_attn.q_proj.weight' in the base"):
        LoraDelta(adapter, CheckpointReader(tmp_path / "other2"))


def test_lora_and_full_finetune_merge_together(tiny, tmp_path):
    """What the paper could not do: a LoRA hospital and a full fine-tune hospital in one merge."""
    from fedmerge.merging.engine import MergeSpec, merge

    base, (ft1, *_) = tiny
    adapter, merged = _peft_lora(base, tmp_path, r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"])
    spec = MergeSpec(method="task_arithmetic", model_parameters=[{"weight": 0.5}, {"weight": 0.5}], device="cpu")
    merge(base, [ft1, adapter], tmp_path / "out", spec, progress=False)
    got, b, f, m = tensors(tmp_path / "out"), tensors(base), tensors(ft1), tensors(merged)
    for n in got:
        exp = b[n] + 0.5 * (f[n] - b[n]) + 0.5 * (m[n] - b[n])
        torch.testing.assert_close(got[n], exp, rtol=1e-5, atol=1e-6)
    meta = json.loads((tmp_path / "out" / "fedmerge.json").read_text())
    assert [i["kind"] for i in meta["inputs"]] == ["model", "lora"]
