"""``fedmerge merge`` and ``fedmerge inspect`` end to end on tiny real checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import tiny_set

from fedmerge.cli import main
from fedmerge.checkpoints import CheckpointReader


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_set(tmp_path_factory)


def test_mergekit_yaml_merge_loads_in_transformers(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, fts = tiny
    cfg = tmp_path / "ties.yaml"
    cfg.write_text(
        f"""
merge_method: ties
base_model: {base}
models:
  - model: {base}
  - model: {fts[0]}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {fts[1]}
    parameters: {{weight: 0.5, density: 0.5}}
parameters: {{normalize: true}}
dtype: float32
"""
    )
    out = tmp_path / "merged"
    rc = main(["merge", str(cfg), str(out), "--seed", "3", "--out-dtype", "bfloat16", "--shard-size", "20KB", "--no-progress"])
    assert rc == 0
    assert "merged 2 inputs with ties" in capsys.readouterr().out
    meta = json.loads((out / "fedmerge.json").read_text())
    assert (meta["method"], meta["seed"], meta["out_dtype"], meta["config_format"]) == ("ties", 3, "bfloat16", "mergekit")
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    r = CheckpointReader(out)
    assert {r.info(n).dtype for n in r.names()} == {"BF16"}
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the patient presents with fever", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    # merged weights differ from every input (the merge did something) but stay close to the base
    b = CheckpointReader(base)
    w = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(r.get(w).float(), b.get(w).to(torch.bfloat16).float())


def test_cli_errors_are_one_line_naming_the_field(tiny, tmp_path, capsys):
    base, fts = tiny
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"method: ties\nbase: {base}\nmodels:\n  - path: {fts[0]}\n    parameters: {{density: 1.5}}\n  - path: {fts[1]}\n")
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "fedmerge merge: error:" in err and "models[0].parameters.density" in err
    assert not (tmp_path / "out").exists()
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--shard-size", "huge"]) == 1
    assert "--shard-size" in capsys.readouterr().err


def test_inspect_cli_json(tiny, capsys):
    base, fts = tiny
    assert main(["inspect", str(base), str(fts[0]), str(fts[1]), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["compatible"] and len(rep["layers"]) == 5
    assert all(-1.0 <= c <= 1.0 for row in rep["layers"] for c in row["cosine"].values())
    assert rep["alignment"]["available"]


# -- outputs that load the way users expect ---------------------------------------------------------
def _linked(tiny, tmp_path):
    """A config folder with the models linked under relative names (as users write configs)."""
    base, fts = tiny
    cfg_dir = tmp_path / "cfg"
    (cfg_dir / "models").mkdir(parents=True)
    for src, name in [(base, "base"), *[(f, f"ft{i + 1}") for i, f in enumerate(fts)]]:
        (cfg_dir / "models" / name).symlink_to(src, target_is_directory=True)
    return cfg_dir


TIES_BF16 = """# a mergekit config with relative paths
merge_method: ties
base_model: models/base
models:
  - model: models/ft1
    parameters: {weight: 0.5, density: 0.5}
  - model: models/ft2
    parameters: {weight: 0.5, density: 0.5}
dtype: float32
out_dtype: bfloat16
"""


def test_outputs_dtype_card_config_copy_and_mode(tiny, tmp_path, capsys, monkeypatch):
    import os

    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    from fedmerge.checkpoints import model_fingerprint
    from fedmerge.merging.strategies import get_strategy_class

    base, fts = tiny
    cfg_dir = _linked(tiny, tmp_path)
    cfg = cfg_dir / "ties.yml"
    cfg.write_text(TIES_BF16)
    monkeypatch.chdir(tmp_path)  # run from elsewhere: nothing may depend on the working directory
    out = tmp_path / "merged"
    assert main(["merge", str(cfg.relative_to(tmp_path)), "merged", "--no-progress"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len([line for line in printed if "merged" in line]) == 1  # the result, once
    assert "KiB" in printed[-1] and "GB" not in printed[-1]
    # dtype: written where transformers looks, so dtype="auto" loads what is on disk
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["dtype"] == cfg_json["torch_dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
    # the config, byte for byte, and where it came from (absolute)
    assert (out / "merge_config.yaml").read_text() == TIES_BF16
    meta = json.loads((out / "fedmerge.json").read_text())
    assert meta["config"] == "merge_config.yaml" and meta["config_source"] == str(cfg.resolve())
    # the model card: method, paper, inputs with their fingerprints, the config
    card = ModelCard.load(out / "README.md")
    assert {"merge", "fedmerge", "ties"} <= set(card.data.tags)
    assert get_strategy_class("ties").paper in card.text
    assert model_fingerprint(CheckpointReader(base)) in card.text
    for ft in fts[:2]:
        assert model_fingerprint(CheckpointReader(ft)) in card.text
    assert "out_dtype: bfloat16" in card.text
    # normal folder permissions (the temporary folder was 0700)
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask


def test_shard_size_in_mergekit_notation(tiny, tmp_path):
    cfg_dir = _linked(tiny, tmp_path)
    cfg = cfg_dir / "ties.yml"
    cfg.write_text(TIES_BF16)
    assert main(["merge", str(cfg), str(tmp_path / "small"), "--shard-size", "20K", "--no-progress"]) == 0
    shards = sorted((tmp_path / "small").glob("model-*.safetensors"))
    assert len(shards) > 2
    r = CheckpointReader(tmp_path / "small")
    for s in shards:  # each shard holds at most 20 000 bytes of tensors (or one larger tensor)
        names = [n for n in r.names() if r.file_of(n) == s]
        assert sum(r.info(n).nbytes for n in names) <= 20_000 or len(names) == 1
    assert main(["merge", str(cfg), str(tmp_path / "big"), "--shard-size", "5B", "--no-progress"]) == 0
    assert [p.name for p in (tmp_path / "big").glob("*.safetensors")] == ["model.safetensors"]


# -- the command line ------------------------------------------------------------------------------
def test_version_and_global_flags_anywhere(capsys):
    from fedmerge import __version__
    from fedmerge.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"fedmerge {__version__}"
    parser = build_parser()
    after = parser.parse_args(["inspect", "b", "m", "-v", "-q"])
    before = parser.parse_args(["-v", "inspect", "b", "m"])
    neither = parser.parse_args(["inspect", "b", "m"])
    assert (after.verbose, after.quiet) == (1, True)
    assert (before.verbose, before.quiet) == (1, False)  # not reset by the sub-command's parser
    assert (neither.verbose, neither.quiet) == (0, False)
    assert parser.parse_args(["merge", "c.yml", "out", "-vv"]).verbose == 2


def test_every_merge_command_and_option_has_help(capsys):
    import argparse

    from fedmerge.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name in ("merge", "inspect", "strategies"):
        assert helps[name], name
        for action in sub.choices[name]._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings or action.dest}"
    for action in parser._actions:
        assert action.help, action.option_strings
    assert main(["strategies"]) == 0
    text = capsys.readouterr().out
    assert "lambda=1.0" in text and "lambda_" not in text and "density=1.0" in text and "epsilon=0.15" in text


# -- interrupted merges leave nothing behind ------------------------------------------------------------
SLOW_CLI = '''
import sys, time, pathlib
from fedmerge.merging.strategies import register
from fedmerge.merging.strategies.linear import Linear

marker = pathlib.Path(sys.argv[1])


@register
class SlowLinear(Linear):
    """Linear, one tensor every 0.3 s (so the test can stop it mid-way)."""

    name = "slow_linear"
    elementwise = False

    def merge_tensor(self, ctx, base, deltas):
        marker.touch()
        time.sleep(0.3)
        return super().merge_tensor(ctx, base, deltas)


from fedmerge.cli import main

sys.exit(main(sys.argv[2:]))
'''


def test_sigterm_removes_the_partial_folder(tiny, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    base, fts = tiny
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    cfg = tmp_path / "slow.yml"
    cfg.write_text(f"method: slow_linear\nbase: {base}\nmodels: [{{path: {fts[0]}}}, {{path: {fts[1]}}}]\n")
    marker = tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script), str(marker), "merge", str(cfg), str(tmp_path / "out"), "--no-progress"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        partial = list(tmp_path.glob(f".out.partial-{proc.pid}-*"))
        assert len(partial) == 1  # the owner's pid is in the name
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert rc == 128 + signal.SIGTERM, err
    assert "terminated by SIGTERM; the partial output was removed" in err
    assert not partial[0].exists() and not (tmp_path / "out").exists()


def test_a_later_run_removes_partial_folders_of_dead_processes_only(tiny, tmp_path):
    import os
    import subprocess

    base, fts = tiny
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f".out.partial-{gone.pid}-abcd1234"
    live = tmp_path / f".out.partial-{os.getpid()}-efgh5678"
    for d in (dead, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half written")
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"method: linear\nmodels: [{{path: {fts[0]}}}, {{path: {fts[1]}}}]\n")
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 0
    assert not dead.exists() and live.exists()
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_single_model_task_arithmetic_both_formats(tiny, tmp_path):
    base, fts = tiny
    b, f = (CheckpointReader(base), CheckpointReader(fts[0]))
    for fmt, text in (
        ("fedmerge", f"method: task_arithmetic\nbase: {base}\nmodels: [{{path: {fts[0]}, parameters: {{weight: 0.7}}}}]\n"),
        ("mergekit", f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {fts[0]}, parameters: {{weight: 0.7}}}}]\ndtype: float32\n"),
    ):
        cfg = tmp_path / f"{fmt}.yml"
        cfg.write_text(text)
        assert main(["merge", str(cfg), str(tmp_path / fmt), "--no-progress"]) == 0
        r = CheckpointReader(tmp_path / fmt)
        for n in b.names():
            torch.testing.assert_close(r.get(n), b.get(n) + 0.7 * (f.get(n) - b.get(n)), rtol=0, atol=1e-6)


def test_mergekit_model_stock_maps_to_the_registry(tiny, tmp_path):
    """mergekit's model_stock: t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the
    task vectors (each tensor flattened); w = t * mean(models) + (1 - t) * base."""
    base, fts = tiny
    cfg = tmp_path / "ms.yml"
    cfg.write_text(f"merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {fts[0]}\n  - model: {fts[1]}\n  - model: {fts[2]}\ndtype: float32\n")
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 0
    b = CheckpointReader(base)
    ms = [CheckpointReader(f) for f in fts]
    r = CheckpointReader(tmp_path / "out")
    for n in b.names():
        w0 = b.get(n).float()
        ws = [m.get(n).float() for m in ms]
        offs = [(w - w0).reshape(-1) for w in ws]
        cos = [torch.dot(offs[i], offs[j]) / (offs[i].norm() * offs[j].norm()).clamp(min=1e-6) for i in range(3) for j in range(i + 1, 3)]
        c = torch.stack(cos).mean().clamp(-1, 1)
        t = 3 * c / (1 + 2 * c)
        expected = t * sum(ws) / 3 + (1 - t) * w0
        torch.testing.assert_close(r.get(n).float(), expected, rtol=0, atol=1e-5)
