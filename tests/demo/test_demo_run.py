"""The whole demo pipeline on the small world (configs/demo-small.yaml): world, federation rounds
with local training, every strategy, the evaluator item by item, the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedmerge.demo.config import DemoConfig, load_demo_config
from fedmerge.demo.world import ensure_world, task_name


SEEDS = 2  # two worlds: the tests see the pooled report as --seeds makes it


REPO = Path(__file__).resolve().parents[2]
# Switches a person might have set that would hide library output: cleared, so what the test sees
# silenced is silenced by fedmerge.
_LIBRARY_SWITCHES = ("TQDM_DISABLE", "TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_DATASETS_DISABLE_PROGRESS_BARS",
                     "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "TOKENIZERS_PARALLELISM")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`fedmerge demo --config configs/demo-small.yaml --seeds 2 --keep-models`, run as a person runs it:
    its own process, outside any git repository, no library switch set."""
    import os
    import subprocess
    import sys

    cfg = load_demo_config("configs/demo-small.yaml")
    cache = tmp_path_factory.mktemp("cache")
    workdir = tmp_path_factory.mktemp("workdir")
    out = workdir / "fedmerge-demo"
    env = {k: v for k, v in os.environ.items() if k not in _LIBRARY_SWITCHES}
    env.update(PYTHONPATH=str(REPO), GIT_CEILING_DIRECTORIES=str(workdir.parent))
    cmd = [sys.executable, "-m", "fedmerge", "demo", "--config", str(REPO / "configs" / "demo-small.yaml"), "--out", str(out),
           "--cache", str(cache), "--seeds", str(SEEDS), "--keep-models"]
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-3000:]
    raw = json.loads((out / "results.json").read_text())
    return cfg, cache, out, raw, done.stdout, done.stderr


def _rows(raw, seed=0):
    return [r for r in raw["rows"] if r["seed"] == seed]


def _row(raw, label, seed=0):
    return next(r for r in _rows(raw, seed) if r["label"] == label)


def _acc(row, task):
    return row["scores"][task]["acc"]


def test_each_specialist_beats_the_base_on_its_own_specialty(demo):
    cfg, _, _, raw, _, _ = demo
    for seed in raw["seeds"]:
        base = _row(raw, "base", seed)
        parents = [r for r in _rows(raw, seed) if r["role"] == "parent"]
        for specialty in cfg.world.specialties:
            t = task_name(specialty)
            hospital = next(r for r in parents if r["label"].endswith(f"({specialty})"))
            assert _acc(hospital, t) >= _acc(base, t) + 0.25, (seed, specialty)
            # ... and is beaten on every other specialty by that specialty's own hospital
            for other in cfg.world.specialties:
                if other != specialty:
                    owner = next(r for r in parents if r["label"].endswith(f"({other})"))
                    assert _acc(owner, task_name(other)) > _acc(hospital, task_name(other))


def test_every_strategy_gives_a_loadable_model_with_finite_outputs(demo):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedmerge.merging.strategies import available

    cfg, _, out, raw, _, _ = demo
    expected = [m.label for m in cfg.merges if m.method in available()]
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs", "hierarchical"} <= set(expected)
    scored = {r["label"] for r in _rows(raw) if r["role"] == "merge"}
    for label in expected:
        assert label in scored
        folder = out / "world-0" / "models" / label
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok("Question: What finding is typical of it?\nAnswer:", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert logits.shape[-1] == model.config.vocab_size
        assert torch.isfinite(logits).all(), label
        for task, score in _row(raw, label)["scores"].items():
            assert 0.0 <= score["acc"] <= 1.0 and score["stderr"] is not None and math.isfinite(score["stderr"]), (label, task)


def test_item_scores_are_the_accuracy_item_by_item(demo):
    """The evaluator's per-item scores (what the intervals resample) give its accuracy, on the same items for every model."""
    _, _, _, raw, _, _ = demo
    for seed in raw["seeds"]:
        table = raw["items"][str(seed)]
        for r in _rows(raw, seed):
            for t in raw["tasks"]:
                bits = table[t]["correct"][r["label"]]
                assert set(bits) <= {"0", "1"} and len(bits) == len(table[t]["ids"]) > 0
                assert bits.count("1") / len(bits) == pytest.approx(_acc(r, t))


def test_the_first_round_publishes_the_offline_merge_of_its_contributions(demo, tmp_path):
    """Round 1's model is the offline merge of the same verified contributions, pushed as the
    federation pushes it: base + decode(encode(merge - base)) with the demo's codec (exact when none)."""
    from fedmerge.checkpoints import CheckpointReader, model_fingerprint
    from fedmerge.checkpoints.codecs import parse_compression
    from fedmerge.checkpoints.rebuild import encode_and_rebuild

    cfg, cache, out, raw, _, _ = demo
    first = raw["worlds"][0]["federation"]["rounds"][0]
    offline = next(m for m in cfg.merges if (m.method, m.parameters) == (first["method"], first["parameters"]))
    models = out / "world-0" / "models"
    expected = models / offline.label
    if cfg.federation.compression != "none":
        world, _ = ensure_world(cfg.world, cache)
        _, expected = encode_and_rebuild(expected, world.base, tmp_path / "delta", tmp_path / "published", parse_compression(cfg.federation.compression), 0)
    with CheckpointReader(models / "federation-round-1") as fed, CheckpointReader(expected) as published:
        assert model_fingerprint(fed) == model_fingerprint(published)


@pytest.fixture(scope="module")
def federation_without_test_items(demo, tmp_path_factory):
    """The federation stage alone, run with the test exams moved out of reach (so it cannot read them)."""
    from fedmerge.demo.run import FederationStage

    cfg, cache, _, _, _, _ = demo
    world, _ = ensure_world(cfg.world, cache)
    root = tmp_path_factory.mktemp("federation-only") / "federation"
    hidden = world.tasks_dir.with_name("tasks.hidden")
    world.tasks_dir.rename(hidden)
    try:
        fed = FederationStage(cfg, world, root).run()
        assert not world.tasks_dir.exists()
    finally:
        hidden.rename(world.tasks_dir)
    return cfg, world, root, fed


def test_the_federation_stage_reads_no_test_item(federation_without_test_items):
    """Every round chose among its candidates on the hospitals' validation splits alone, the test exams out of reach."""
    cfg, _, _, fed = federation_without_test_items
    assert [r.round for r in fed.rounds] == list(range(1, cfg.federation.rounds + 1))
    assert cfg.federation.selection.mode == "federated"
    for r in fed.rounds:
        sel = r.record["selection"]
        assert sel["mode"] == "federated" and sel["rule"] == cfg.federation.selection.rule and not sel["fallback"]
        assert [c["strategy"]["parameters"] for c in sel["candidates"]] == [c.parameters for c in cfg.federation.selection.candidates]
        assert set(sel["scores"]) == set(fed.institutions)  # every hospital scored ...
        for inst, per_candidate in sel["scores"].items():  # ... every candidate, on its own split only
            assert set(per_candidate) == {c["id"] for c in sel["candidates"]}
            for accuracies in per_candidate.values():
                assert set(accuracies) == {"demo_val_general", f"demo_val_{fed.institutions[inst]}"}
        chosen = next(c for c in sel["candidates"] if c["id"] == sel["chosen"])
        assert (r.method, r.parameters) == (chosen["strategy"]["method"], chosen["strategy"]["parameters"])
        # the rule: the worst hospital's mean validation accuracy, highest for the chosen candidate
        worst = {c["id"]: min(sum(sel["scores"][i][c["id"]].values()) / 2 for i in fed.institutions) for c in sel["candidates"]}
        assert worst[sel["chosen"]] == max(worst.values())


def test_later_rounds_merge_what_the_hospitals_trained_from_the_global_model(federation_without_test_items):
    """Round 2's contribution of each hospital is exactly its train hook's model minus round 1's published model."""
    import torch

    from fedmerge.checkpoints import CheckpointReader
    from fedmerge.merging.taskvector import DeltaCheckpoint

    cfg, world, root, fed = federation_without_test_items
    assert len(fed.rounds) == cfg.federation.rounds >= 2
    r1, r2 = fed.rounds[0], fed.rounds[1]
    assert r1.record["reference"]["kind"] == "base" and r2.record["reference"]["kind"] == "global"
    assert r2.record["reference"]["fingerprint"] == r1.record["merge"]["fingerprint"]
    steps = cfg.federation.local_training.steps
    for inst, specialty in fed.institutions.items():
        assert r1.local[inst]["trained"] is False  # before round 1 a hospital sends its fine-tune
        assert r2.local[inst]["trained"] is True and r2.local[inst]["steps"] == steps
        delta = DeltaCheckpoint(r2.record["contributions"][inst]["delta_dir"])
        trained = root / "clients" / inst / "trained" / "round-0002"
        moved_from_finetune = 0.0
        with CheckpointReader(r1.model_dir) as g, CheckpointReader(trained) as t, CheckpointReader(world.hospitals[specialty]) as f:
            for name in t.names():
                d = delta.get_delta(name)
                true = t.get(name).float() - g.get(name).float()
                if delta.codecs.get(name) is not None:  # int4: within half a step of its group's scale (absmax / 7, bf16)
                    groups, got = true.reshape(true.shape[0], -1, 64), d.reshape(true.shape[0], -1, 64)
                    bound = groups.abs().amax(dim=-1, keepdim=True) / 14 * (1 + 2**-7) + 1e-7
                    assert ((got - groups).abs() <= bound).all(), name
                else:
                    contribution = g.get(name).float() + (d if d is not None else 0.0)
                    torch.testing.assert_close(contribution, t.get(name).float(), rtol=0, atol=1e-6)
                moved_from_finetune = max(moved_from_finetune, (t.get(name).float() - f.get(name).float()).abs().max().item())
        assert moved_from_finetune > 1e-3  # not the fine-tune sent again


def test_results_json_rows_and_labels(demo):
    cfg, _, _, raw, _, _ = demo
    tasks = raw["tasks"]
    assert tasks == [task_name(d) for d in ["general", *cfg.world.specialties]]
    assert raw["seeds"] == [cfg.world.seed + i for i in range(SEEDS)]
    for seed in raw["seeds"]:
        roles = {r["label"]: r["role"] for r in _rows(raw, seed)}
        assert roles["base"] == "base"
        assert sorted(label for label, role in roles.items() if role == "parent") == sorted(
            f"hospital-{chr(97 + i)} ({s})" for i, s in enumerate(cfg.world.specialties))
        published = [r for r in _rows(raw, seed) if r["label"].startswith("federation round ")]
        assert [r["round"] for r in published] == list(range(1, cfg.federation.rounds + 1))
        for r in published:
            assert r["label"].startswith(f"federation round {r['round']} (") and r["role"] == "merge"
        for r in _rows(raw, seed):
            assert set(r["scores"]) == set(tasks) and all(0.0 <= _acc(r, t) <= 1.0 for t in tasks)
    # every merge has its paired gains; the hospitals, being the comparison, have none
    for p in raw["pooled"]:
        assert (p["vs_best_hospital"] is not None) == (p["role"] == "merge")
        g = p["vs_best_hospital"]
        if g is not None:
            assert g["low"] <= g["estimate"] <= g["high"]


def test_seeds_pool_the_worlds(demo):
    """--seeds N: N different worlds, each scored on its own exams; the pooled table is their mean and
    the pooled interval resamples the items of all of them."""
    from fedmerge.demo.stats import paired_bootstrap

    cfg, _, out, raw, _, _ = demo
    roots = {w["root"] for w in raw["worlds"]}
    assert len(roots) == SEEDS
    assert all((out / f"world-{s}" / "results.db").exists() for s in raw["seeds"])
    last = f"federation round {cfg.federation.rounds}"
    pooled = next(p for p in raw["pooled"] if p["key"] == last)
    per_world = [next(r for r in _rows(raw, s) if r["key"] == last) for s in raw["seeds"]]
    for t in raw["tasks"]:
        assert pooled["scores"][t]["acc"] == pytest.approx(sum(_acc(r, t) for r in per_world) / SEEDS)
    # the interval, recomputed from the item table: strata are (world, exam), the comparison each world's best hospital
    a, b = {}, {}
    for s in raw["seeds"]:
        best = next(w for w in raw["worlds"] if w["seed"] == s)["best_hospital"]
        for t in raw["tasks"]:
            a[f"{s}/{t}"] = [float(x) for x in raw["items"][str(s)][t]["correct"][next(r for r in _rows(raw, s) if r["key"] == last)["label"]]]
            b[f"{s}/{t}"] = [float(x) for x in raw["items"][str(s)][t]["correct"][best]]
    gain = paired_bootstrap(a, b)
    assert gain.items == sum(len(v) for v in a.values())
    assert pooled["vs_best_hospital"]["estimate"] == pytest.approx(gain.estimate)
    assert pooled["vs_best_hospital"]["low"] == pytest.approx(gain.low) and pooled["vs_best_hospital"]["high"] == pytest.approx(gain.high)
    assert [g["seed"] for g in raw["last_round"]] == raw["seeds"]


def test_report_and_plots_are_written(demo):
    _, _, out, _, stdout, _ = demo
    for name in ("rounds.png", "general_vs_specialties.png", "density_sweep.png", "world-0/evaluation/methods.png"):
        assert (out / name).stat().st_size > 1000, name
    report = (out / "report.md").read_text()
    summary = (out / "summary.md").read_text()
    assert summary in report and "| base |" in summary and "Pareto front" in report
    assert "federation round 2" in stdout and "vs best hospital" in stdout


def test_the_terminal_tells_a_short_story_without_library_noise(demo):
    cfg, _, out, _, stdout, stderr = demo
    lines = (stdout + stderr).splitlines()
    assert len(lines) <= 60, "\n".join(lines)
    for noise in ("%|", "it/s", "Writing model shards", "fatal:", "lm_eval", "lm-eval", "transformers", "INFO", "WARNING",
                  "Warning", "huggingface", "tokenizers", "flwr", "DEBUG"):
        assert not any(noise in line for line in lines), (noise, [ln for ln in lines if noise in ln])
    # the story: each stage once per world, the table, where the report is
    for seed in range(SEEDS):
        assert sum(line.startswith(f"world {seed}: ") for line in lines) == 1
    assert sum(line.startswith("federation: ") and "done in" in line for line in lines) == SEEDS
    assert any(line.startswith("model ") and "mean" in line for line in lines)
    assert f"report:  {out / 'report.md'}" in lines


def test_the_world_is_cached(demo):
    cfg, cache, _, raw, _, _ = demo
    assert all(w["built_now"] for w in raw["worlds"])
    world, built = ensure_world(cfg.world, cache)
    assert not built and world.root.name == cfg.world.key()


def test_each_hospital_validates_on_its_own_split_and_trains_on_its_own_text(demo, tmp_path):
    """The layout of a federated selection: client.yaml points each hospital at its private validation
    split (general medicine and its specialty, no test item) and at a train hook reading its own text."""
    import yaml

    from fedmerge.client.config import load_client_config
    from fedmerge.demo.run import FederationStage
    from fedmerge.eval.config import EvalConfig
    from fedmerge.federation.toy import institution_names
    from fedmerge.server.config import load_federation_config

    cfg, cache, _, _, _, _ = demo
    world, _ = ensure_world(cfg.world, cache)
    raw = cfg.model_dump(mode="json")
    raw["federation"]["selection"] = {"mode": "federated", "rule": "worst",
                                      "candidates": [{"method": "iso_c", "parameters": {"alpha": a}} for a in (0.5, 1.0)]}
    stage = FederationStage(DemoConfig.model_validate(raw), world, tmp_path / "federation")
    names = institution_names(len(world.hospitals))
    layout = stage.layout(names, list(world.hospitals))
    fed_cfg = load_federation_config(layout.federation_config)  # the coordinator accepts what the demo wrote
    assert fed_cfg.reference == "global" and fed_cfg.selection.mode == "federated" and fed_cfg.selection.rule == "worst"
    assert [c.parameters["alpha"] for c in fed_cfg.selection.specs()] == [0.5, 1.0]
    test_files = {p.name for p in world.tasks_dir.iterdir()}
    texts = {}
    for name, specialty in zip(names, world.hospitals):
        client = yaml.safe_load(layout.client_configs[name].read_text())
        assert load_client_config(layout.client_configs[name]).validation == client["validation"]  # and so does the hospital
        ev = EvalConfig.from_yaml(client["validation"])
        assert ev.tasks == ["demo_val_general", f"demo_val_{specialty}"]
        assert [p.resolve() for p in ev.task_dirs] == [world.validation_dir(specialty).resolve()]
        assert not {p.name for p in world.validation_dir(specialty).iterdir()} & test_files
        hook = client["train_hook"]
        text = Path(hook[hook.index("--corpus") + 1])
        docs = [json.loads(line) for line in text.read_text().splitlines()]
        assert docs == world.hospital_text(specialty, general_share=True)
        texts[specialty] = set(docs)
    general = set(world.corpus("general"))
    shares = [texts[s] & general for s in world.hospitals]
    assert all(shares) and not any(a & b for i, a in enumerate(shares) for b in shares[i + 1:])  # each its own share
    for s in world.hospitals:  # and no other specialty's text
        assert not texts[s] & set().union(*(set(world.corpus(o)) for o in world.hospitals if o != s))


def test_central_selection_scores_on_the_consortium_split_at_the_coordinator(demo, tmp_path):
    """selection: central: the coordinator holds the consortium's validation split (every domain, no test
    item); the hospitals hold no validation config."""
    import yaml

    from fedmerge.demo.run import FederationStage
    from fedmerge.demo.world import CONSORTIUM
    from fedmerge.eval.config import EvalConfig
    from fedmerge.federation.toy import institution_names
    from fedmerge.server.config import load_federation_config

    cfg, cache, _, _, _, _ = demo
    world, _ = ensure_world(cfg.world, cache)
    raw = cfg.model_dump(mode="json")
    raw["federation"]["selection"]["mode"] = "central"
    stage = FederationStage(DemoConfig.model_validate(raw), world, tmp_path / "federation")
    names = institution_names(len(world.hospitals))
    layout = stage.layout(names, list(world.hospitals))
    fed_cfg = load_federation_config(layout.federation_config)
    assert fed_cfg.selection.mode == "central"
    ev = EvalConfig.from_yaml(fed_cfg.selection.eval_config)
    assert ev.tasks == [f"demo_val_{d}" for d in ["general", *cfg.world.specialties]]
    assert [p.resolve() for p in ev.task_dirs] == [world.validation_dir(CONSORTIUM).resolve()]
    for name in names:
        assert "validation" not in yaml.safe_load(layout.client_configs[name].read_text())


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
