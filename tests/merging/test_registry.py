"""The registry: names and errors, methods from other packages (entry points), the typed
elementwise decorator, the table of task-arithmetic variants, and `fedmerge strategies`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Annotated, Sequence

import pytest
import torch
from pydantic import Field

from fedmerge.merging.strategies import ModelParams, StrategyError, TensorContext, available, build_strategy, describe, get_strategy_class
from fedmerge.merging.strategies import elementwise
from fedmerge.merging.strategies.sparsify import VARIANTS

REPO = Path(__file__).resolve().parents[2]


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(StrategyError) as err:
        get_strategy_class("tie")
    msg = str(err.value)
    assert "unknown merge method 'tie'" in msg
    for name in ("ties", "iso_c", "model_stock", "task_arithmetic"):
        assert name in msg
    assert get_strategy_class(" TIES ").name == "ties"  # names are case-insensitive


def test_describe_uses_the_names_users_write():
    info = describe("task_arithmetic")
    assert [(p.name, p.default) for p in info.parameters] == [("lambda", 1.0), ("normalize", False)]
    assert [(p.name, p.default) for p in info.per_model] == [("weight", 1.0)]
    assert info.min_models == 1 and info.needs_base and "Ilharco" in info.paper
    iso = describe("iso_cts")
    assert {p.name: p.default for p in iso.parameters} == {"alpha": 1.0, "token_tables": "spectral", "common_space_fraction": 0.8}
    assert "ICML 2025" in iso.paper and iso.min_models == 2


def test_every_method_has_a_paper_and_its_model_counts():
    counts = {name: (e.cls.min_models, e.cls.max_models) for name, e in available().items()}
    assert counts["task_arithmetic"] == (1, None) and counts["linear"] == (1, None)
    assert counts["slerp"] == (2, 2)
    for name in ("ties", "dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties"):
        assert counts[name] == (1, None), name
    for name in ("hierarchical", "iso_c", "iso_cts", "tsv_m", "model_stock"):
        assert counts[name] == (2, None), name
    assert all(describe(n).paper for n in available())


def test_fedmerge_strategies_prints_parameters_with_defaults_and_papers(capsys):
    from fedmerge.cli import main

    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    assert "parameters: lambda=1.0, normalize=false" in out  # task_arithmetic, user-facing names
    assert "lambda_" not in out
    assert "per model: weight=1.0, density=1.0, epsilon=0.15; models: 1+; needs a base" in out  # della
    assert "parameters: alpha=1.0, token_tables=spectral, common_space_fraction=0.8" in out
    assert "paper: Jang et al., Model Stock" in out
    assert out.count("paper: ") == len(available())


# -- task arithmetic on one model ----------------------------------------------------------------------


def test_task_arithmetic_applies_a_single_task_vector(tmp_path_factory, tmp_path):
    s = build_strategy("task_arithmetic", {"lambda": 0.5}, [{"weight": 2.0}])
    base, d = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    assert torch.equal(s.merge_tensor(TensorContext("w", s.model_params, 0), base, [d]), base + d)
    # and through the engine: one fine-tune folder, lambda 1, gives that fine-tune back
    from engine_helpers import tensors, tiny_set

    from fedmerge.merging.engine import MergeSpec, merge

    base_dir, fts = tiny_set(tmp_path_factory, n=1)
    merge(base_dir, fts, tmp_path / "out", MergeSpec(method="task_arithmetic", device="cpu"), progress=False)
    got, want = tensors(tmp_path / "out"), tensors(fts[0])
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=0, atol=1e-6), name


def test_methods_that_need_two_models_say_so():
    with pytest.raises(StrategyError, match="hierarchical needs at least 2 models, got 1"):
        build_strategy("hierarchical", {}, [{}])


# -- the variant table -----------------------------------------------------------------------------------


def test_each_table_row_is_a_registered_method_with_its_defaults():
    expected = {  # docs/strategies.md: consensus, normalize, rescale per method
        "ties": (True, True, False),
        "dare_ties": (True, False, True),
        "dare_linear": (False, False, True),
        "della": (True, True, True),
        "della_linear": (False, False, True),
        "breadcrumbs": (False, False, False),
        "breadcrumbs_ties": (True, False, False),
    }
    assert {v.name for v in VARIANTS} == set(expected)
    for v in VARIANTS:
        cls = get_strategy_class(v.name)
        assert cls.variant is v and cls.paper == v.paper and cls.PerModel is v.per_model
        p = cls.Params()
        assert (hasattr(p, "consensus"), p.normalize, p.rescale) == expected[v.name], v.name
        assert p.lambda_ == 1.0 and p.rescale_mode == "probability"
        assert cls.__doc__.splitlines()[0] == available()[v.name].summary


# -- the elementwise decorator ------------------------------------------------------------------------------


class Gain(ModelParams):
    gain: float = Field(1.0, ge=0.0)


def test_the_signature_is_the_schema():
    @elementwise.elementwise_method("test_scaled_sum", paper="(test)")
    def scaled_sum(ctx, base, deltas: Sequence, models: Sequence[Gain], *, lambda_: Annotated[float, Field(gt=0.0, description="scale")] = 2.0, shift: float = 0.0):
        """Scaled sum: base + lambda sum_i gain_i delta_i + shift."""
        out = base + shift
        for mp, d in zip(models, deltas):
            out = out + lambda_ * mp.gain * d
        return out

    try:
        cls = get_strategy_class("test_scaled_sum")
        assert cls is scaled_sum and cls.elementwise and cls.PerModel is Gain and cls.min_models == 1
        info = describe("test_scaled_sum")
        assert [(p.name, p.default, p.description) for p in info.parameters] == [("lambda", 2.0, "scale"), ("shift", 0.0, "")]
        s = build_strategy("test_scaled_sum", {"lambda": 0.5, "shift": 1.0}, [{"gain": 2.0}, {}])
        out = s.merge_tensor(TensorContext("w", s.model_params, 0), torch.zeros(2), [torch.ones(2), torch.full((2,), 4.0)])
        assert torch.equal(out, torch.full((2,), 1.0 + 0.5 * (2.0 + 4.0)))
        with pytest.raises(StrategyError, match="parameters.lambda"):
            build_strategy("test_scaled_sum", {"lambda": 0.0}, [{}])
        with pytest.raises(StrategyError, match=r"models\[0\].parameters.gain"):
            build_strategy("test_scaled_sum", {}, [{"gain": -1.0}])
        with pytest.raises(StrategyError, match="parameters.shift"):
            build_strategy("test_scaled_sum", {"shift": "up"}, [{}])
    finally:
        from fedmerge.merging.strategies import registry

        registry._REGISTRY.pop("test_scaled_sum", None)


def test_a_signature_that_is_not_a_schema_is_refused():
    with pytest.raises(TypeError, match="needs a type annotation"):
        elementwise.elementwise_method("test_bad", paper="-")(lambda ctx, base, deltas, *, k=1: base)
    with pytest.raises(TypeError, match=r"takes \(ctx, base, deltas"):

        def wrong(base, deltas, *, k: int = 1):
            return base

        elementwise.elementwise_method("test_bad", paper="-")(wrong)
    assert "test_bad" not in available()


# -- methods from other packages ----------------------------------------------------------------------------


PLUGIN = '''
from fedmerge.merging.strategies import Strategy, StrategyParams
from pydantic import Field


class HalfParams(StrategyParams):
    share: float = Field(0.5, gt=0, le=1)


class HalfDelta(Strategy):
    """Half delta: base + share * mean of the task vectors."""

    name = "half_delta"
    paper = "(a plugin)"
    Params = HalfParams

    def merge_tensor(self, ctx, base, deltas):
        return base + self.params.share * sum(deltas) / len(deltas)


class Misnamed(HalfDelta):
    name = "something_else"
'''

ENTRY_POINTS = """
[fedmerge.strategies]
half_delta = fm_plugin_demo:HalfDelta
misnamed = fm_plugin_demo:Misnamed
ties = fm_plugin_demo:HalfDelta
broken = fm_plugin_missing:Nope
"""

PROBE = """
import json, torch
from fedmerge.merging.strategies import available, build_strategy, describe, get_strategy_class, plugin_errors, StrategyError, TensorContext
out = {"names": sorted(available()), "errors": plugin_errors(), "origin": describe("half_delta").origin,
       "params": [(p.name, p.default) for p in describe("half_delta").parameters], "ties_paper": get_strategy_class("ties").paper}
s = build_strategy("half_delta", {"share": 0.25}, [{}, {}])
out["merged"] = s.merge_tensor(TensorContext("w", s.model_params, 0), torch.zeros(2), [torch.ones(2), torch.full((2,), 3.0)]).tolist()
try:
    get_strategy_class("broken")
except StrategyError as exc:
    out["broken"] = str(exc)
print(json.dumps(out))
"""


def test_a_method_from_another_package_is_found_through_its_entry_point(tmp_path):
    (tmp_path / "fm_plugin_demo.py").write_text(PLUGIN)
    dist = tmp_path / "fm_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fm-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(ENTRY_POINTS))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "half_delta" in got["names"] and "misnamed" not in got["names"] and "broken" not in got["names"]
    assert got["origin"].startswith("entry point half_delta = fm_plugin_demo:HalfDelta (fm-plugin-demo 0.1)")
    assert got["params"] == [["share", 0.5]]
    assert got["merged"] == [0.5, 0.5]  # 0.25 * (1 + 3) / 2
    assert "ties" in got["errors"] and "built-in" in got["errors"]["ties"] and "TIES" in got["ties_paper"]  # the built-in stays
    assert "something_else" in got["errors"]["misnamed"]
    assert "import failed" in got["errors"]["broken"] and "could not be registered" in got["broken"]
    # the CLI lists the plugin and says where it came from, and what was not loaded
    cli = subprocess.run([sys.executable, "-m", "fedmerge.cli", "strategies"], capture_output=True, text=True, env=env, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert "half_delta" in cli.stdout and "from entry point half_delta" in cli.stdout and "(not loaded)" in cli.stdout
