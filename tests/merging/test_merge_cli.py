"""``fedmerge merge`` and ``fedmerge inspect`` end to end on tiny real checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import tiny_set

from fedmerge.cli import main
from fedmerge.checkpoints import CheckpointReader


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_set(tmp_path_factory)


def test_mergekit_yaml_merge_loads_in_transformers(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, fts = tiny
    cfg = tmp_path / "ties.yaml"
    cfg.write_text(
        f"""
merge_method: ties
base_model: {base}
models:
  - model: {base}
  - model: {fts[0]}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {fts[1]}
    parameters: {{weight: 0.5, density: 0.5}}
parameters: {{normalize: true}}
dtype: float32
"""
    )
    out = tmp_path / "merged"
    rc = main(["merge", str(cfg), str(out), "--seed", "3", "--out-dtype", "bfloat16", "--shard-size", "20KB", "--no-progress"])
    assert rc == 0
    assert "merged 2 inputs with ties" in capsys.readouterr().out
    meta = json.loads((out / "fedmerge.json").read_text())
    assert (meta["method"], meta["seed"], meta["out_dtype"], meta["config_format"]) == ("ties", 3, "bfloat16", "mergekit")
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    r = CheckpointReader(out)
    assert {r.info(n).dtype for n in r.names()} == {"BF16"}
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the patient presents with fever", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    # merged weights differ from every input (the merge did something) but stay close to the base
    b = CheckpointReader(base)
    w = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(r.get(w).float(), b.get(w).to(torch.bfloat16).float())


def test_cli_errors_are_one_line_naming_the_field(tiny, tmp_path, capsys):
    base, fts = tiny
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"method: ties\nbase: {base}\nmodels:\n  - path: {fts[0]}\n    parameters: {{density: 1.5}}\n  - path: {fts[1]}\n")
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "fedmerge merge: error:" in err and "models[0].parameters.density" in err
    assert not (tmp_path / "out").exists()
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--shard-size", "huge"]) == 1
    assert "--shard-size" in capsys.readouterr().err


def test_inspect_cli_json(tiny, capsys):
    base, fts = tiny
    assert main(["inspect", str(base), str(fts[0]), str(fts[1]), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["compatible"] and len(rep["layers"]) == 5
    assert all(-1.0 <= c <= 1.0 for row in rep["layers"] for c in row["cosine"].values())
    assert rep["alignment"]["available"]
