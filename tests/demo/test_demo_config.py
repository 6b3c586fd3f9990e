"""The demo's configuration: configs/demo.yaml is the built-in default, errors name the field."""

from __future__ import annotations

import pytest

from fedmerge.demo.config import DemoConfig, DemoConfigError, load_demo_config


def test_configs_demo_yaml_is_the_built_in_default():
    assert load_demo_config("configs/demo.yaml") == DemoConfig() == load_demo_config(None)


def test_small_config_differs_in_world_only_where_it_says():
    small = load_demo_config("configs/demo-small.yaml")
    assert small.world.key() != DemoConfig().world.key()
    default = {m.label: m for m in DemoConfig().merges}
    assert all(default[m.label] == m for m in small.merges)  # a subset of the default comparison, same settings
    paper = ["linear", "task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs", "hierarchical"]
    assert [m.label for m in small.merges][:7] == [m.label for m in DemoConfig().merges][:7] == paper


def test_the_default_federation_selects_on_validation_data_between_rounds_of_local_training():
    fed = DemoConfig().federation
    assert fed.selection.mode == "federated" and 1 < len(fed.selection.candidates) <= fed.selection.max_candidates <= 4
    assert fed.rounds >= 2 and fed.reference == "global" and fed.local_training is not None


def test_world_key_ignores_everything_but_the_world():
    a = DemoConfig()
    b = a.model_copy(update={"density_sweep": [0.5], "merges": a.merges[:1]})
    assert a.world.key() == b.world.key()
    c = a.model_copy(update={"world": a.world.model_copy(update={"seed": 1})})
    assert a.world.key() != c.world.key()


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("world: {conditions_per_domain: 2}", "world.conditions_per_domain"),
        ("world: {specialties: [cardiology, cardiology]}", "world.specialties"),
        ("density_sweep: [0.6, 1.5]", "density_sweep"),
        ("evaluation: {num_shots: 5}", "evaluation.num_shots"),
        ("federation: {selection: {mode: federated, candidates: []}}", "federation.selection"),
        ("federation: {selection: {max_candidates: 2}}", "federation.selection"),
        ("federation: {selection: {rule: best}}", "federation.selection.rule"),
        ("federation: {local_training: {steps: 0}}", "federation.local_training.steps"),
    ],
)
def test_bad_fields_are_named(tmp_path, text, field):
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    with pytest.raises(DemoConfigError) as err:
        load_demo_config(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(DemoConfigError, match="no such config file"):
        load_demo_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("world: [unclosed")
    with pytest.raises(DemoConfigError, match="not valid YAML"):
        load_demo_config(bad)
