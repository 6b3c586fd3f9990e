"""configs/paper: every merge file loads and runs, here on tiny stand-ins for the 7B checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

PAPER = Path("configs/paper")
METHODS = ["linear", "task_arithmetic", "dare_ties", "della", "breadcrumbs", "hierarchical"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A copy of configs/paper beside a checkpoints/ folder holding tiny models of the same names."""
    from fedmerge.toymodels import TinyMistralSpec, build_tiny_mistral, perturb_checkpoint

    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(PAPER, root / "configs" / "paper")
    ck = root / "checkpoints"
    base = build_tiny_mistral(ck / "Mistral-7B-Instruct-v0.1", TinyMistralSpec(hidden_size=32, intermediate_size=64), seed=0)
    perturb_checkpoint(base, ck / "BioMistral-7B", seed=1, scale=0.05)
    perturb_checkpoint(base, ck / "TachyHealth", seed=2, scale=0.05)
    return root


@pytest.mark.parametrize("method", METHODS)
def test_paper_merge_config_runs(repo, method, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from fedmerge.merging.mergeconfig import load_merge_config, run_merge_plan

    cfg = repo / "configs" / "paper" / f"{method}.yaml"
    raw = yaml.safe_load(cfg.read_text())
    assert raw.get("merge_method", raw.get("method")) == method
    plan = load_merge_config(cfg)
    run_merge_plan(plan, tmp_path / "out", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 3]])).logits
    assert torch.isfinite(logits).all()


def test_paper_hyper_parameters():
    """Table II and section III-D of the paper, as written in the files."""
    def per_model(name):
        raw = yaml.safe_load((PAPER / f"{name}.yaml").read_text())
        return [m.get("parameters", {}) for m in raw["models"]]

    assert all(p["weight"] == 0.5 for n in ("linear", "task_arithmetic") for p in per_model(n))
    assert all(p["density"] == 0.6 for p in per_model("dare_ties"))
    assert all((p["density"], p["epsilon"]) == (0.6, 0.05) for p in per_model("della"))
    assert all((p["density"], p["gamma"]) == (0.9, 0.01) for p in per_model("breadcrumbs"))
    from fedmerge.eval.config import EvalConfig

    cfg = EvalConfig.from_yaml(PAPER / "eval.yaml")
    assert cfg.batch_size == "auto" and set(cfg.builtin_datasets) == set(cfg.tasks)
    ev = yaml.safe_load((PAPER / "eval.yaml").read_text())
    assert ev["num_fewshot"] == 5 and ev["dtype"] == "bfloat16"
    assert ev["tasks"] == ["medqa_4options", "pubmedqa", "mmlu_professional_medicine", "medmcqa", "hellaswag"]
