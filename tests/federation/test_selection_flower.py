"""Federated selection under Flower's simulation engine: the candidate messages travel through Flower
(ServerApp in the driver, ClientApps in Ray actors) and the hospitals' scores come back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fedtest_helpers import assert_same_tensors, offline_merge
from roundkit import edit_yaml

pytest.importorskip("ray", reason="Flower's simulation extra (ray) is not installed")

CANDIDATES = [
    {"method": "task_arithmetic", "parameters": {"lambda": 0.5}},
    {"method": "ties", "parameters": {"density": 0.5}},
    {"method": "ties", "parameters": {"density": 1.0}},
]


@pytest.mark.slow
def test_federated_selection_on_flower_engine(make_federation, tmp_path):
    tf = make_federation(3, seal=True)
    edit_yaml(tf.federation_config, selection={"mode": "federated", "rule": "worst", "candidates": CANDIDATES})
    for name, path in tf.client_configs.items():
        (path.parent / f"{name}-val.yaml").write_text(yaml.safe_dump({"tasks": [f"val_{name[-1]}"]}))
        edit_yaml(path, validation=f"{name}-val.yaml", validation_scorer="selection_scorers:FixedScorer")
    sim = tmp_path / "simulate.yaml"
    sim.write_text(yaml.safe_dump({"engine": "flower", "flower": {"cpus": 2, "object_store_mb": 256}, "federation_config": str(tf.federation_config),
                                   "client_configs": [str(tf.client_configs[k]) for k in sorted(tf.client_configs)]}))  # fmt: skip
    here = str(Path(__file__).parent)  # the ClientApps (Ray actors) import the scorer from here
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), here) if p))
    proc = subprocess.run([sys.executable, "-m", "fedmerge", "simulate", str(sim), "--json"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rec = json.loads(proc.stdout[proc.stdout.index("{") :])["rounds"][0]["record"]
    sel = rec["selection"]
    assert rec["status"] == "completed" and sel["failures"] == [] and sel["chosen"] == "c2"  # worst: hospital-b's 0.55
    assert sel["scores"]["hospital-b"] == {"c1": {"val_b": 0.5}, "c2": {"val_b": 0.55}, "c3": {"val_b": 0.3}}
    assert sorted(sel["scores"]) == sorted(tf.client_configs)
    package_bytes = sum(c["package_bytes"] for c in sel["candidates"])
    assert sel["bytes_sent"] == {k: package_bytes for k in tf.client_configs}
    offline = offline_merge(tf.base, [tf.finetunes[k] for k in sorted(tf.client_configs)], tmp_path / "offline", CANDIDATES[1])
    for name in tf.client_configs:
        assert_same_tensors(tf.root / "clients" / name / "models" / "current", offline)
