"""``selection:`` in the federation config: candidates checked when the file loads, not mid-round."""

from __future__ import annotations

import pytest
import yaml
from roundkit import edit_yaml

from fedmerge.configfile import ConfigError
from fedmerge.server.config import load_federation_config


def _load_with(tf, selection: dict):
    edit_yaml(tf.federation_config, selection=selection)
    return load_federation_config(tf.federation_config)


def test_candidates_and_a_grid_expand_in_order(make_federation):
    tf = make_federation(3)
    cfg = _load_with(tf, {"mode": "federated", "rule": "worst", "max_candidates": 5,
                          "candidates": [{"method": "ties", "parameters": {"density": 1.0}}],
                          "grid": {"method": "task_arithmetic", "parameters": {"normalize": True}, "vary": {"lambda": [0.5, 1.0], "weight": [1.0, 0.5]}}})  # fmt: skip
    specs = [(s.method, s.parameters) for s in cfg.selection.specs()]
    assert specs == [
        ("ties", {"density": 1.0}),
        ("task_arithmetic", {"normalize": True, "lambda": 0.5, "weight": 1.0}),
        ("task_arithmetic", {"normalize": True, "lambda": 0.5, "weight": 0.5}),
        ("task_arithmetic", {"normalize": True, "lambda": 1.0, "weight": 1.0}),
        ("task_arithmetic", {"normalize": True, "lambda": 1.0, "weight": 0.5}),
    ]
    assert cfg.selection.rule == "worst" and cfg.selection.delta_dtype == "bfloat16"
    assert load_federation_config(tf.federation_config.parent / "federation.yaml").selection.mode == "federated"


def test_without_selection_the_configured_strategy_is_published(make_federation):
    cfg = load_federation_config(make_federation(2).federation_config)
    assert cfg.selection.mode == "none" and not cfg.selection.enabled and cfg.selection.specs() == []


def test_more_candidates_than_max_candidates_are_refused_unless_it_is_raised(make_federation):
    tf = make_federation(3)
    five = {"mode": "federated", "grid": {"method": "iso_c", "vary": {"alpha": [0.5, 0.75, 1.0, 1.25, 1.5]}}}
    with pytest.raises(ConfigError) as err:
        _load_with(tf, five)
    assert str(tf.federation_config) in str(err.value)
    assert "selection: 5 candidates, more than max_candidates (4)" in str(err.value) and "raise max_candidates explicitly" in str(err.value)
    assert len(_load_with(tf, {**five, "max_candidates": 5}).selection.specs()) == 5
    with pytest.raises(ConfigError, match="5 candidates, more than max_candidates \\(2\\)"):
        _load_with(tf, {**five, "max_candidates": 2})


@pytest.mark.parametrize(
    "selection, message",
    [
        ({"mode": "federated", "candidates": [{"method": "tiez"}]}, "selection.candidates[0].method: unknown merge method 'tiez'; valid methods:"),
        ({"mode": "federated", "grid": {"method": "iso_c", "vary": {"alpah": [0.5]}}}, "selection: grid[0] (iso_c alpah=0.5): iso_c parameters: parameters.alpah: Extra inputs are not permitted"),
        ({"mode": "federated", "grid": {"method": "ties", "vary": {"density": [0.5, 1.5]}}}, "grid[0] (ties density=1.5)"),
        ({"mode": "federated", "grid": {"method": "ties", "vary": {"density": []}}}, "selection.grid[0].vary: density: give at least one value"),
        ({"mode": "federated"}, "selection: mode federated needs candidates"),
        ({"mode": "none", "candidates": [{"method": "ties"}]}, "candidates are listed but mode is none"),
        ({"mode": "central", "candidates": [{"method": "ties"}]}, "mode central needs eval_config"),
        ({"mode": "central", "candidates": [{"method": "ties"}], "eval_config": "no-such-eval.yaml"}, "selection: eval_config: "),
        ({"mode": "federated", "candidates": [{"method": "ties"}], "eval_config": "eval.yaml"}, "eval_config is read only with mode: central"),
        ({"mode": "federated", "candidates": [{"method": "ties"}, {"method": "ties", "seed": 0}]}, "candidate c2 is the same merge as c1 (ties)"),
        ({"mode": "federated", "candidates": [{"method": "ties"}], "rule": "median"}, "selection.rule: Input should be 'mean' or 'worst'"),
        ({"mode": "federated", "candidates": [{"method": "slerp", "parameters": {"t": 0.5}}]}, "selection candidate c1 (slerp t=0.5) merges at most 2 contributions"),
    ],
)
def test_a_wrong_selection_fails_when_the_config_loads(make_federation, selection, message):
    tf = make_federation(3)
    if selection.get("mode") == "federated" and selection.get("candidates", [{}])[0].get("method") == "slerp":
        edit_yaml(tf.federation_config, clients_per_round=3)
    with pytest.raises(ConfigError) as err:
        _load_with(tf, selection)
    assert str(tf.federation_config) in str(err.value) and message in str(err.value), str(err.value)


def test_central_eval_config_is_read_relative_to_the_federation_config(make_federation):
    tf = make_federation(2)
    (tf.federation_config.parent / "validation.yaml").write_text(yaml.safe_dump({"tasks": ["toy_val"], "device": "cpu"}))
    cfg = _load_with(tf, {"mode": "central", "candidates": [{"method": "ties"}], "eval_config": "validation.yaml"})
    assert cfg.selection.eval_config == str(tf.federation_config.parent / "validation.yaml")
