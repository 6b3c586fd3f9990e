"""The whole demo pipeline on the small world (configs/demo-small.yaml): world, federation,
every strategy, the evaluator, the report."""

from __future__ import annotations

import json
import math

import pytest

from fedmerge.demo.config import load_demo_config
from fedmerge.demo.run import run_demo
from fedmerge.demo.world import ensure_world, task_name


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cfg = load_demo_config("configs/demo-small.yaml")
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("out") / "fedmerge-demo"
    lines: list[str] = []
    result = run_demo(cfg, out, cache=cache, keep_models=True, say=lines.append)
    return cfg, cache, out, result, lines


def _row(result, label):
    return next(r for r in result.rows if r.label == label)


def test_each_specialist_beats_the_base_on_its_own_specialty(small):
    cfg, _, _, result, _ = small
    base = _row(result, "base")
    for specialty in cfg.world.specialties:
        t = task_name(specialty)
        hospital = next(r for r in result.rows if r.role == "parent" and r.label.endswith(f"({specialty})"))
        assert hospital.scores[t][0] >= base.scores[t][0] + 0.25, (specialty, hospital.scores[t], base.scores[t])
        # ... and is beaten on every other specialty by that specialty's own hospital
        for other in cfg.world.specialties:
            if other != specialty:
                owner = next(r for r in result.rows if r.role == "parent" and r.label.endswith(f"({other})"))
                assert owner.scores[task_name(other)][0] > hospital.scores[task_name(other)][0]


def test_every_strategy_gives_a_loadable_model_with_finite_outputs(small):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedmerge.merging.strategies import available

    cfg, _, out, result, _ = small
    expected = [m.label for m in cfg.merges if m.method in available()]
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs"} <= set(expected)
    scored = {r.label for r in result.rows if r.role == "merge"}
    for label in expected:
        assert label in scored
        folder = out / "models" / label
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok("Question: What finding is typical of it?\nAnswer:", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert logits.shape[-1] == model.config.vocab_size
        assert torch.isfinite(logits).all(), label
        for task, (acc, se) in _row(result, label).scores.items():
            assert 0.0 <= acc <= 1.0 and se is not None and math.isfinite(se), (label, task)
            if 0.0 < acc < 1.0:
                assert se > 0.0, (label, task)


def test_the_federations_model_is_the_offline_merge_of_the_same_contributions(small):
    from fedmerge.checkpoints import CheckpointReader, model_fingerprint

    cfg, _, out, result, _ = small
    assert cfg.federation.method == "task_arithmetic"
    assert cfg.federation.parameters == next(m for m in cfg.merges if m.label == "task_arithmetic").parameters
    with CheckpointReader(out / "models" / "federation-round-1") as fed, CheckpointReader(out / "models" / "task_arithmetic") as offline:
        assert model_fingerprint(fed) == model_fingerprint(offline)
    fed_row = next(r for r in result.rows if r.label.startswith("federation round"))
    assert fed_row.scores == _row(result, "task_arithmetic").scores


def test_sweep_report_and_raw_results_are_written(small):
    cfg, _, out, result, lines = small
    assert [d for d, _ in result.sweep] == cfg.density_sweep
    assert (out / "density_sweep.png").stat().st_size > 1000
    assert (out / "evaluation" / "methods.png").exists()
    report = (out / "report.md").read_text()
    assert "| base |" in report and "DARE-TIES density sweep" in report
    raw = json.loads((out / "results.json").read_text())
    assert {r["label"] for r in raw["rows"]} == {r.label for r in result.rows}
    assert raw["federation"]["record"]["status"] == "completed"
    assert len(raw["federation"]["record"]["contributors"]) == len(cfg.world.specialties)
    assert "base" in result.table and any("federation" in ln for ln in lines)


def test_the_world_is_cached(small):
    cfg, cache, _, result, _ = small
    assert result.world_built
    world, built = ensure_world(cfg.world, cache)
    assert not built and world.root.name == cfg.world.key()


def test_training_is_reproducible():
    import torch
    from transformers import MistralForCausalLM

    from fedmerge.demo.training import TrainSettings, train
    from fedmerge.toymodels import TinyMistralSpec, mistral_config

    spec = TinyMistralSpec(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    stream = torch.arange(400) % 61
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        model = MistralForCausalLM(mistral_config(spec))
        losses = train(model, stream, TrainSettings(steps=4, lr=1e-2, batch_size=4, block_size=16, warmup_steps=1), seed=5)
        states.append(model.state_dict())
    assert losses[-1] < losses[0]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
