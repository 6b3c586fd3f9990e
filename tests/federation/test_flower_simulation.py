"""`fedmerge simulate` under Flower's simulation engine: ServerApp in the driver, ClientApps in Ray actors.

Runs the CLI in a subprocess so Ray's processes start and end with it, and checks what every
simulated hospital installed against the offline merge of the same inputs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from fedtest_helpers import assert_same_tensors, offline_merge

pytest.importorskip("ray", reason="Flower's simulation extra (ray) is not installed")


def test_simulate_on_flower_engine_installs_the_offline_merge(make_federation, tmp_path):
    strategy = {"method": "ties", "parameters": {"density": 0.5}, "seed": 5}
    n = 4  # N is a parameter: one more than the deployment tests use
    tf = make_federation(n, rounds=2, strategy=strategy, seal=True)
    sim = tmp_path / "simulate.yaml"
    sim.write_text(
        yaml.safe_dump(
            {
                "engine": "flower",
                "flower": {"cpus": 2, "object_store_mb": 256},
                "federation_config": str(tf.federation_config),
                "client_configs": [str(tf.client_configs[k]) for k in sorted(tf.client_configs)],
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fedmerge", "simulate", str(sim), "--json"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])

    assert [r["status"] for r in report["rounds"]] == ["completed", "completed"]
    # Round 2's reference is the base (reference: base), so both rounds merge the same deltas.
    offline = offline_merge(tf.base, [tf.finetunes[k] for k in sorted(tf.client_configs)], tmp_path / "offline", strategy)
    for name in tf.client_configs:
        assert report["installed"][name] == [1, 2]
        assert assert_same_tensors(tf.root / "clients" / name / "models" / "current", offline) == 21
    rec = report["rounds"][1]["record"]
    assert rec["contributors"] == sorted(tf.client_configs) and rec["rejections"] == [] and rec["drops"] == []
    assert all(report["bytes_sent"][k] == 2 * rec["contributions"][k]["bytes"] for k in tf.client_configs)
    # Flower's engine, not the in-process grid (nodes 1..N), carried the messages: its node ids are random 64-bit.
    assert all(v["node"] > 2**16 for v in rec["contributions"].values())
    # ...and each was bound to the institution of its partition's config, as Flower assigned it.
    assert sorted(rec["sampled"]) == sorted(tf.client_configs) and rec["sampled"] == {k: v["node"] for k, v in rec["contributions"].items()}
