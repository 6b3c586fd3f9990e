"""Merge configs in both formats: what they mean, and errors that name the YAML field."""

from __future__ import annotations

import pytest
from engine_helpers import tiny_set

from fedmerge.merging.mergeconfig import MergeConfigError, load_merge_config, parse_size


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_set(tmp_path_factory)


def _cfg(tmp_path, text, name="merge.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture
def here(tiny, tmp_path):
    """A config folder with the models linked under relative names."""
    base, fts = tiny
    (tmp_path / "models").mkdir()
    for src, name in [(base, "base"), *[(f, f"ft{i + 1}") for i, f in enumerate(fts)]]:
        (tmp_path / "models" / name).symlink_to(src, target_is_directory=True)
    return tmp_path


def test_fedmerge_format(here):
    plan = load_merge_config(
        _cfg(
            here,
            """
method: ties
base: models/base
models:
  - path: models/ft1
    parameters: {weight: 0.6, density: 0.5}
  - path: models/ft2
    kind: model
    label: hospital-b
parameters: {lambda: 0.9}
out_dtype: bf16
seed: 7
shard_size: 500MB
""",
        )
    )
    assert plan.format == "fedmerge" and plan.base == here / "models/base"
    assert [i.path for i in plan.inputs] == [here / "models/ft1", here / "models/ft2"]
    assert plan.inputs[1].label == "hospital-b" and plan.inputs[1].kind == "model"
    s = plan.spec
    assert (s.method, s.parameters, s.seed, s.out_dtype, s.max_shard_bytes) == ("ties", {"lambda": 0.9}, 7, "bfloat16", 500 * 10**6)
    assert s.model_parameters == [{"weight": 0.6, "density": 0.5}, {}]


def test_mergekit_format_drops_base_from_models_for_base_methods(here):
    plan = load_merge_config(
        _cfg(
            here,
            """
merge_method: dare_ties
base_model: models/base
models:
  - model: models/base
  - model: models/ft1
    parameters: {weight: 0.5, density: 0.7}
  - model: models/ft2
    parameters: {weight: 0.5, density: 0.7}
parameters: {int8_mask: true}
dtype: bfloat16
""",
        )
    )
    assert plan.format == "mergekit"
    # mergekit: dtype is the compute dtype and, without out_dtype, the output dtype
    assert plan.spec.dtype == "bfloat16" and plan.spec.out_dtype == "bfloat16"
    compiled = plan.compile()
    assert [s.label for s in compiled.sources] == ["models/ft1", "models/ft2"]
    layout = compiled.layout
    assert layout.references[0].folder == here / "models/base"
    assert all(t.inputs and [i for i, _ in t.inputs] == [0, 1] for t in layout.tensors)
    # one parameter set for every tensor; rescale to the original L1 norm, as mergekit does
    assert layout.parameter_sets[0].model_params == ({"weight": 0.5, "density": 0.7},) * 2
    assert layout.parameter_sets[0].params == {"int8_mask": True, "rescale_mode": "l1"}
    assert {t.params for t in layout.tensors} == {0}


def test_mergekit_slerp_slices_base_is_first_endpoint(here):
    plan = load_merge_config(
        _cfg(
            here,
            """
slices:
  - sources:
      - model: models/ft2
        layer_range: [0, 2]
      - model: models/base
        layer_range: [0, 2]
merge_method: slerp
base_model: models/base
parameters:
  t: 0.25
dtype: float32
""",
        )
    )
    compiled = plan.compile()
    assert [s.label for s in compiled.sources] == ["models/base", "models/ft2"]
    assert {tuple(i for i, _ in t.inputs) for t in compiled.layout.tensors} == {(0, 1)}
    assert compiled.layout.parameter_sets[0].params == {"t": 0.25}
    assert compiled.layout.num_layers == 2
    too_far = load_merge_config(_cfg(here, "slices:\n  - sources:\n      - {model: models/ft1, layer_range: [0, 3]}\n      - {model: models/base, layer_range: [0, 3]}\nmerge_method: slerp\nbase_model: models/base\nparameters: {t: 0.5}\n", "s.yaml"))
    with pytest.raises(MergeConfigError, match="slices\\[0\\].sources\\[0\\].layer_range: \\[0, 3\\] goes past the last layer of 'models/ft1' \\(2 layers\\)"):
        too_far.compile()


@pytest.mark.parametrize(
    "text, message",
    [
        ("method: ties\nbase: models/base\nmodels:\n  - path: models/ft1\n  - path: models/nope\n", "models\\[1\\].path: 'models/nope' does not exist"),
        ("method: ties\nbase: models/base\nmodels:\n  - {path: models/ft1, wieght: 1}\n", "models\\[0\\].wieght: Extra inputs are not permitted"),
        ("method: ties\nmodels: []\n", "models: List should have at least 1 item"),
        ("method: ties\nbase: models/base\nmodels: [{path: models/ft1}]\nshard_size: lots\n", "shard_size: 'lots' is not a size"),
        ("method: ties\nbase: models/base\nmodels: [{path: models/ft1}]\ndtype: int8\n", "dtype: compute dtype must be one of"),
        ("method: slerp\nmodels: [{path: models/ft1}, {path: models/ft2}]\nparameters:\n  t: [0, 0.5, 1]\n", "parameters: t: per-layer gradients and filtered values are read in mergekit's format only"),
        ("merge_method: ties\nbase_model: models/base\nmodels:\n  - model: mistralai/Mistral-7B-v0.1\n", "models\\[0\\].model: 'mistralai/Mistral-7B-v0.1' does not exist .*never downloads"),
        ("merge_method: frankenmerge\nbase_model: models/base\nmodels: [{model: models/ft1}]\n", "merge_method: unknown merge method 'frankenmerge'; valid methods: .*task_arithmetic"),
        ("merge_method: ties\nmodels: [{model: models/ft1}]\ntokenizer_source: union\n", "base_model: ties is defined on task vectors from a base model; give base_model"),
        ("merge_method: ties\nbase_modle: models/base\nmodels: [{model: models/ft1}]\n", "base_modle: not a mergekit config key; did you mean 'base_model'"),
        ("models: [{model: models/ft1}]\n", "no 'method' \\(fedmerge format\\) or 'merge_method' \\(mergekit format\\)"),
        ("method: [unclosed\n", "not valid YAML"),
    ],
)
def test_errors_name_the_field(here, text, message):
    path = _cfg(here, text)
    with pytest.raises(MergeConfigError, match=message) as exc:
        load_merge_config(path)
    assert str(path) in str(exc.value)


def test_lora_adapter_entries_are_detected_at_run_time(here):
    from fedmerge.merging.taskvector import open_delta_source

    adapter = here / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    plan = load_merge_config(_cfg(here, "method: task_arithmetic\nbase: models/base\nmodels: [{path: adapter}, {path: models/ft1}]\n"))
    assert plan.inputs[0].kind == "auto"
    from fedmerge.merging.lora import LoraError

    with pytest.raises(LoraError, match="no adapter_model.safetensors"):  # detected as LoRA, then read as one
        open_delta_source(plan.inputs[0].path, plan.base)


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("4096") == 4096 and parse_size(10) == 10
    # mergekit's notation: K, M, B are thousands, millions, billions (its default shard size is 5B)
    assert parse_size("5B") == parse_size("5b") == 5_000_000_000
    assert parse_size("500M") == 500_000_000 and parse_size("100K") == 100_000
    for bad in ("0MB", "5 bytes", "lots", "-1"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_example_configs_parse(tiny, tmp_path):
    """The shipped examples are valid: laid out with the model folders they name, they load."""
    import shutil
    from pathlib import Path

    base, fts = tiny
    repo = Path(__file__).resolve().parents[2]
    cfg_dir = tmp_path / "configs" / "merge"
    cfg_dir.mkdir(parents=True)
    models = tmp_path / "models"
    models.mkdir()
    for name, src in [("base", base), ("hospital-a", fts[0]), ("hospital-b", fts[1]), ("hospital-c-lora", fts[2])]:
        (models / name).symlink_to(src, target_is_directory=True)
    examples = sorted((repo / "configs" / "merge").glob("*.yaml"))
    assert len(examples) >= 4
    for ex in examples:
        shutil.copy(ex, cfg_dir / ex.name)
        plan = load_merge_config(cfg_dir / ex.name)
        assert plan.model_folders and all(p.exists() for p in plan.model_folders), ex.name
        if ex.name.startswith("slerp"):  # written for a 32-layer model; the tiny one has 2
            with pytest.raises(MergeConfigError, match="goes past the last layer of '../../models/hospital-a' \\(2 layers\\)"):
                plan.compile()
