"""Rounds with compressed contributions, over the in-process grid (the real round loop and ClientApp)."""

from __future__ import annotations

import json

import pytest
import torch
from fedtest_helpers import assert_same_tensors
from roundkit import client_config_copy

from fedmerge.checkpoints import CheckpointReader
from fedmerge.checkpoints.codecs import TensorCodec, parse_compression
from fedmerge.configfile import ConfigError
from fedmerge.federation.inprocess import run_simulation
from fedmerge.merging.engine import MergeSpec, merge
from fedmerge.merging.taskvector import DeltaCheckpoint, TaskVector
from fedmerge.protocol import OPEN_ROUND, read_meta
from fedmerge.server.config import load_federation_config

STRATEGY = {"method": "task_arithmetic", "parameters": {"lambda": 0.6}, "seed": 1}
PART = 4 * 1024 * 1024


def test_an_int4_round_merges_and_installs_the_encoded_contributions(make_federation, tmp_path):
    tf = make_federation(3, strategy=STRATEGY, part_bytes=PART, federation_overrides={"compression": "int4"})
    asked: list[dict] = []

    def note_open_round(node, msg):
        if msg.metadata.message_type == OPEN_ROUND:
            asked.append(read_meta(msg.content))
        return True

    report = run_simulation(tf.federation_config, list(tf.client_configs.values()), hooks=[note_open_round])
    assert [r.status for r in report.rounds] == ["completed"]
    assert [m["compression"] for m in asked] == ["int4"] * 3
    rnd = report.rounds[0]
    # each int4 package fits the one part that rides on the open reply: accepted once, never refused after
    assert all(c.bytes <= PART for c in rnd.record.contributions.values())
    assert rnd.record.rejections == [] and rnd.record.drops == []
    deltas = {inst: DeltaCheckpoint(d, label=inst) for inst, d in sorted(rnd.delta_dirs.items())}
    # every accepted contribution is stored encoded, and decodes to the codec of the hospital's true delta
    comp = parse_compression("int4")
    for inst, dc in deltas.items():
        assert dc.compression == "int4"
        seed = json.loads((dc.folder / "fedmerge.json").read_text())["compression"]["seed"]
        true = TaskVector(tf.finetunes[inst], tf.base)
        name = "model.layers.0.mlp.down_proj.weight"
        d = true.get_delta(name)
        codec = TensorCodec(comp, name, tuple(d.shape), seed, "F32")
        assert torch.equal(dc.get_delta(name), codec.decode(codec.encode(d, 0), 0))
        assert torch.nn.functional.cosine_similarity(dc.get_delta(name).flatten(), d.flatten(), dim=0) > 0.99
    # what every hospital installed is the merge of exactly those contributions
    offline = tmp_path / "offline"
    merge(tf.base, list(deltas.values()), offline, MergeSpec(**STRATEGY), progress=False)
    for name in tf.client_configs:
        assert assert_same_tensors(tf.root / "clients" / name / "models" / "current", offline) == 21
    # and each package was about a seventh of the float32 one (int4 matrices, float32 vectors)
    infos = CheckpointReader(tf.base).infos()
    exact = sum(i.numel * 4 for i in infos)
    for c in rnd.record.contributions.values():
        assert c.bytes < exact / 6


def test_a_hospital_that_does_not_allow_the_spec_refuses_the_round(make_federation):
    tf = make_federation(3, min_clients=2, federation_overrides={"compression": "sparse:0.25+int4"})
    configs = dict(tf.client_configs)
    configs["hospital-c"] = client_config_copy(tf, "hospital-c", "hospital-c-strict", compression=["none", "int8"])
    report = run_simulation(tf.federation_config, list(configs.values()))
    rec = report.rounds[0].record
    assert report.rounds[0].status == "completed"
    assert sorted(rec.contributions) == ["hospital-a", "hospital-b"]
    drop = next(d for d in rec.drops if d.institution == "hospital-c")
    assert "CompressionRefused" in drop.reason and "sparse:0.25+int4" in drop.reason and "none, int8" in drop.reason


def test_a_hospital_refuses_a_spec_it_does_not_know(make_federation, tmp_path):
    from fedmerge.client.config import load_client_config
    from fedmerge.client.errors import CompressionRefused
    from fedmerge.client.node import HospitalNode

    tf = make_federation(2)
    node = HospitalNode(load_client_config(tf.client_configs["hospital-a"]))
    with pytest.raises(CompressionRefused) as exc:
        node.open_round(1, "sha256:whatever", 65536, compression="int3")
    assert "unknown codec 'int3'" in str(exc.value) and "int4" in str(exc.value)
    assert node.accepted_compression("SPARSE:0.50+INT4") == "sparse:0.5+int4"


def test_the_federation_config_names_a_bad_compression(make_federation):
    tf = make_federation(2, federation_overrides={"compression": "int4+sparse:0.5"})
    with pytest.raises(ConfigError) as exc:
        load_federation_config(tf.federation_config)
    assert "compression" in str(exc.value) and "must come last" in str(exc.value)


def test_the_federation_config_spells_compression_canonically(make_federation):
    tf = make_federation(2, federation_overrides={"compression": "Sparse:0.50 + INT4"})
    assert load_federation_config(tf.federation_config).compression == "sparse:0.5+int4"


def test_configs_that_do_not_say_stay_exact(make_federation):
    tf = make_federation(2)
    assert load_federation_config(tf.federation_config).compression == "none"


def test_a_compressed_publication_is_rebuilt_exactly_by_every_hospital(make_federation, tmp_path):
    """The coordinator publishes reference + decode(encode(merged - reference)); each hospital
    rebuilds that from the pushed delta, byte for byte, on the base and then on round 1's model."""
    from fedmerge.checkpoints import folder_fingerprint
    from fedmerge.checkpoints.rebuild import read_model_delta

    tf = make_federation(3, rounds=2, strategy=STRATEGY,
                         federation_overrides={"compression": "int4", "publish_compression": "int4", "reference": "global"})  # fmt: skip
    report = run_simulation(tf.federation_config, list(tf.client_configs.values()))
    assert [r.status for r in report.rounds] == ["completed", "completed"]
    for rnd in report.rounds:
        published = rnd.record.merge.model_dir
        assert rnd.record.merge.fingerprint == folder_fingerprint(published)
        for name in tf.client_configs:
            installed = tf.root / "clients" / name / "models" / f"round-{rnd.round:04d}"
            assert assert_same_tensors(installed, published) == 21
            assert sorted(p.name for p in installed.iterdir()) == sorted(p.name for p in rnd_files(published))
        # what was pushed: the small files and the int4 delta, about a seventh of the float32 model
        model_bytes = sum(p.stat().st_size for p in rnd_files(published))
        assert rnd.record.publication.model_bytes < model_bytes / 5
        _, meta = read_model_delta(published + ".delta")
        assert meta["compression"]["spec"] == "int4"
    # round 1's published model is the merge of the contributions, up to int4 on its delta
    r1 = report.rounds[0]
    offline = tmp_path / "offline"
    merge(tf.base, [DeltaCheckpoint(d) for _, d in sorted(r1.delta_dirs.items())], offline, MergeSpec(**STRATEGY), progress=False)
    merged, published, base = (CheckpointReader(p) for p in (offline, r1.record.merge.model_dir, tf.base))
    for name in base.names():
        want = merged.get(name).float() - base.get(name).float()
        got = published.get(name).float() - base.get(name).float()
        if want.dim() >= 2:
            assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99, name
        else:
            assert torch.equal(got, want), name
    # round 2 was rebuilt on round 1's model, which every hospital held
    assert report.rounds[1].record.reference.kind == "global"


def rnd_files(folder):
    from pathlib import Path

    return [p for p in Path(folder).iterdir() if p.is_file()]
