"""mergekit's own example configs, model paths rewritten, through ``fedmerge merge``.

Every example of mergekit's ``examples/`` folder that fits a decoder-only model, run on tiny
40-layer models (the examples' 13B Llamas have 40 layers, so layer ranges stay as written).
Expected weights are computed in the test from the formulas in ``mergekit_reference``; mergekit
is not installed. Each example runs twice: with ``dtype: float32`` (the only change), compared at
1e-5, and exactly as written (``dtype: float16``), checking the written dtype and that the model
loads as float16.
"""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import tensors
from mergekit_reference import layer_of, linear, outlier_mask, slerp, t_of, ties, value

from fedmerge.cli import main
from fedmerge.toymodels import TinyMistralSpec, build_tiny_mistral, perturb_checkpoint

SPEC40 = TinyMistralSpec(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=40, num_attention_heads=4, num_key_value_heads=2)
ATOL = 1e-5


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A float32 40-layer base and four seeded 'fine-tunes' of it, named after the examples' models."""
    root = tmp_path_factory.mktemp("mk-zoo")
    base = build_tiny_mistral(root / "llama2-13b", SPEC40, seed=0)
    out = {"base": base}
    for i, name in enumerate(["orca", "platypus", "wizardlm", "wizardmath"]):
        out[name] = perturb_checkpoint(base, root / name, seed=i + 1, scale=0.05)
    return out


def _run(tmp_path, text: str, zoo: dict, fp32: bool, name: str = "merge.yml"):
    text = text.format(**{k: str(v) for k, v in zoo.items()})
    if fp32:
        text = text.replace("dtype: float16", "dtype: float32")
    cfg = tmp_path / name
    cfg.write_text(text)
    out = tmp_path / ("out32" if fp32 else "out16")
    assert main(["merge", str(cfg), str(out), "--no-progress"]) == 0
    return out


def _compare(out, expected: dict, atol=ATOL):
    got = tensors(out)
    assert set(got) == set(expected)
    for n, e in expected.items():
        torch.testing.assert_close(got[n].float(), e, rtol=0, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def _loads_as(out, dtype):
    from transformers import AutoModelForCausalLM

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == str(dtype).removeprefix("torch.")
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == dtype
    return model


TIES = """
models:
  - model: {orca}
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: {platypus}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: {wizardmath}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def test_ties_example_with_density_and_weight_gradients_and_a_filter(zoo, tmp_path):
    b = tensors(zoo["base"])
    ms = {k: tensors(zoo[k]) for k in ("orca", "platypus", "wizardmath")}
    expected = {}
    for n, bt in b.items():
        t = t_of(n, 40)
        models = [
            (ms["orca"][n], 1.0, value([1, 0.7, 0.1], n, t)),
            (ms["platypus"][n], value([0, 0.3, 0.7, 1], n, t), 0.5),
            (ms["wizardmath"][n], value([{"filter": "mlp", "value": 0.5}, {"value": 0}], n, t), 0.33),
        ]
        expected[n] = ties(bt, models, normalize=True)
    # the gradients did something: layer 39 keeps 10 % of orca's delta, layer 0 all of it
    assert value([1, 0.7, 0.1], "model.layers.39.mlp.up_proj.weight", t_of("model.layers.39.mlp.up_proj.weight", 40)) == pytest.approx(0.1)
    _compare(_run(tmp_path, TIES, zoo, fp32=True), expected)
    out16 = _run(tmp_path, TIES, zoo, fp32=False)
    _loads_as(out16, torch.float16)
    assert "ties" in (out16 / "README.md").read_text()


BIO = """
models:
  - model: {wizardlm}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {orca}
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: {base}
parameters:
  normalize: false
  int8_mask: true
dtype: float16
"""


def test_bio_merge_example_ties_without_normalize(zoo, tmp_path):
    b, w, o = tensors(zoo["base"]), tensors(zoo["wizardlm"]), tensors(zoo["orca"])
    expected = {n: ties(bt, [(w[n], 0.5, 0.5), (o[n], 0.5, 0.5)], normalize=False) for n, bt in b.items()}
    _compare(_run(tmp_path, BIO, zoo, fp32=True), expected)
    _loads_as(_run(tmp_path, BIO, zoo, fp32=False), torch.float16)


GRADIENT_SLERP = """
slices:
  - sources:
      - model: {orca}
        layer_range: [0, 40]
      - model: {platypus}
        layer_range: [0, 40]
merge_method: slerp
base_model: {orca}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
"""


def test_gradient_slerp_example(zoo, tmp_path):
    a, p = tensors(zoo["orca"]), tensors(zoo["platypus"])
    setting = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]
    expected = {n: slerp(value(setting, n, t_of(n, 40)), a[n], p[n]) for n in a}
    # t runs from 0 (orca) at layer 0 to 1 (platypus) at layer 39 for attention, the other way for the MLP
    q0, q39 = "model.layers.0.self_attn.q_proj.weight", "model.layers.39.self_attn.q_proj.weight"
    torch.testing.assert_close(expected[q0], a[q0], rtol=0, atol=1e-6)
    torch.testing.assert_close(expected[q39], p[q39], rtol=0, atol=1e-6)
    out = _run(tmp_path, GRADIENT_SLERP, zoo, fp32=True)
    _compare(out, expected)
    out16 = _run(tmp_path, GRADIENT_SLERP, zoo, fp32=False)
    _loads_as(out16, torch.float16)
    _compare(out16, {n: e.half().float() for n, e in expected.items()}, atol=2e-3)


LINEAR = """
models:
  - model: {orca}
    parameters:
      weight: 1.0
  - model: {wizardlm}
    parameters:
      weight: 0.3
  - model: {platypus}
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""


def test_linear_example_without_base(zoo, tmp_path):
    o, w, p = tensors(zoo["orca"]), tensors(zoo["wizardlm"]), tensors(zoo["platypus"])
    expected = {n: linear([(o[n], 1.0), (w[n], 0.3), (p[n], 0.5)]) for n in o}
    _compare(_run(tmp_path, LINEAR, zoo, fp32=True), expected)
    out16 = _run(tmp_path, LINEAR, zoo, fp32=False)
    _loads_as(out16, torch.float16)
    _compare(out16, expected, atol=2e-3)


FRANKEN = """
slices:
  - sources:
    - model: {orca}
      layer_range: [0, 24]
  - sources:
    - model: {platypus}
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
"""


def test_passthrough_44_layer_frankenmerge(zoo, tmp_path):
    o, p = tensors(zoo["orca"]), tensors(zoo["platypus"])
    expected = {}
    for n in o:
        j = layer_of(n)
        if j is None:  # embeddings from the first slice's model, final norm and head from the last's
            expected[n] = o[n] if "embed" in n else p[n]
        elif j < 24:  # output layers 0..23: orca's 0..23
            expected[n] = o[n]
    for n in p:
        j = layer_of(n)
        if j is not None and j >= 20:  # output layers 24..43: platypus's 20..39
            expected[n.replace(f".layers.{j}.", f".layers.{24 + j - 20}.")] = p[n]
    assert len({layer_of(n) for n in expected} - {None}) == 44
    out = _run(tmp_path, FRANKEN, zoo, fp32=True)
    _compare(out, expected, atol=0)
    model = _loads_as(out, torch.float32)
    assert model.config.num_hidden_layers == 44 and len(model.model.layers) == 44
    out16 = _run(tmp_path, FRANKEN, zoo, fp32=False)
    _loads_as(out16, torch.float16)
    _compare(out16, {n: e.half().float() for n, e in expected.items()}, atol=0)
    card = (out / "README.md").read_text()
    assert str(zoo["platypus"]) in card and str(zoo["orca"]) in card


def test_arcee_fusion_example_is_refused_naming_the_method(zoo, tmp_path, capsys):
    cfg = tmp_path / "arcee.yml"
    cfg.write_text(f"models:\n  - model: {zoo['orca']}\n  - model: {zoo['platypus']}\nmerge_method: arcee_fusion\nbase_model: {zoo['orca']}\ndtype: bfloat16\n")
    assert main(["merge", str(cfg), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{cfg}: merge_method: 'arcee_fusion' is a mergekit method fedmerge does not implement; use one of:" in err
    assert not (tmp_path / "out").exists()


# -- the README's shapes -------------------------------------------------------------------------------
BREADCRUMBS_TIES = """
models:
  - model: {orca}
  - model: {platypus}
    parameters:
      weight: 0.7
merge_method: breadcrumbs_ties
base_model: {base}
parameters:
  weight: 0.4
  density: 0.8
  gamma: 0.1
dtype: float32
"""


def test_breadcrumbs_ties_with_top_level_parameters_as_per_model_defaults(zoo, tmp_path):
    """Top-level per-model parameters are every model's default; breadcrumbs_ties does not normalize.
    (gamma 0.1 keeps int(gamma n) >= 1 on the smallest tensors; below that mergekit's slice
    drops every entry, see docs/merging.md.)"""
    b, o, p = tensors(zoo["base"]), tensors(zoo["orca"]), tensors(zoo["platypus"])

    def mask(d, density):
        return outlier_mask(d, density, 0.1)

    expected = {n: ties(b[n], [(o[n], 0.4, 0.8), (p[n], 0.7, 0.8)], normalize=False, mask=mask) for n in b}
    _compare(_run(tmp_path, BREADCRUMBS_TIES, zoo, fp32=True), expected)


SLERP_SCALAR = """
merge_method: slerp
base_model: {platypus}
slices:
  - sources:
      - model: {orca}
        layer_range: [0, 40]
      - model: {platypus}
        layer_range: [0, 40]
parameters:
  t: 0.3
dtype: float32
"""


def test_slerp_with_one_slice_and_a_scalar_t(zoo, tmp_path):
    o, p = tensors(zoo["orca"]), tensors(zoo["platypus"])
    _compare(_run(tmp_path, SLERP_SCALAR, zoo, fp32=True), {n: slerp(0.3, p[n], o[n]) for n in o})
