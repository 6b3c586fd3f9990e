"""Properties every registered strategy must have, and parameter validation."""

from __future__ import annotations

import pytest
import torch

from fedmerge.merging.strategies import StrategyError, available, build_strategy
from strategy_helpers import merge_states

ALL = sorted(available())
TWO_ONLY = {"slerp"}
# Spectral methods reshape the spectrum of each weight matrix even for identical inputs (their
# definitions give no identity there: see test_spectral.py for what they do give); every other
# tensor they merge by the weighted mean, which is the identity.
SPECTRAL = {"iso_c", "iso_cts", "tsv_m"}
MATRICES = {"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"}  # the 2-D tensors of _state


def _state(seed: int, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    # Multiples of 1/64 keep the sums below exact in float32.
    return {
        "model.embed_tokens.weight": (torch.randn(16, 8, generator=g) * 64).round() / 64 * scale,
        "model.layers.0.mlp.up_proj.weight": (torch.randn(12, 8, generator=g) * 64).round() / 64 * scale,
        "model.norm.weight": (torch.randn(8, generator=g) * 64).round() / 64 * scale,
    }


def _weights(method: str, n: int) -> list[dict]:
    fields = build_strategy(method, {}, [{}] * min(n, 2)).PerModel.model_fields
    return [{"weight": 1.0 / n} if "weight" in fields else {} for _ in range(n)]


def test_every_method_of_the_brief_is_registered():
    assert set(ALL) >= {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "slerp", "hierarchical"}
    assert set(ALL) >= {"iso_c", "iso_cts", "tsv_m", "model_stock"}
    for name, entry in available().items():
        assert entry.cls.paper, name  # every method names its paper
        assert entry.summary, name


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("n", [2, 3])
def test_identical_inputs_give_the_input_back(method, n):
    if method in TWO_ONLY and n > 2:
        pytest.raises(StrategyError, build_strategy, method, {}, [{}] * n)
        return
    base = _state(0)
    model = {k: v + d for (k, v), d in zip(base.items(), _state(1, scale=0.25).values())}
    out = merge_states(method, base, [model] * n, model_params=_weights(method, n))
    for k in base:
        if method in SPECTRAL and k in MATRICES:
            continue
        assert torch.allclose(out[k], model[k], rtol=0, atol=1e-6), (method, k)


@pytest.mark.parametrize("method", ALL)
def test_three_different_models_merge_within_the_inputs_reach(method):
    # N = 3 for every method (slerp refuses it, above). Every method's merged delta is a
    # combination of the inputs' (possibly pruned) deltas with coefficients at most 1 after
    # normalization, rescaled by at most 1/p for the random methods (p = the smallest keep
    # probability: density for DARE, density - epsilon for DELLA): so per entry it never exceeds
    # sum_i |delta_i| / p. And with different inputs it is not the base.
    if method in TWO_ONLY:
        return
    base = _state(0)
    deltas = [_state(10 + i, scale=0.1) for i in range(3)]
    if method == "model_stock":
        # Model Stock returns the base for uncorrelated task vectors (mean cosine <= 0 gives t = 0):
        # give its inputs a shared direction so that the merge has something to move.
        shared = _state(19, scale=0.1)
        deltas = [{k: d[k] + shared[k] for k in d} for d in deltas]
    models = [{k: base[k] + d[k] for k in base} for d in deltas]
    fields = build_strategy(method, {}, [{}] * 3).PerModel.model_fields
    params = {"density": 0.7} if "density" in fields else {}
    p_min = {"dare_ties": 0.7, "dare_linear": 0.7, "della": 0.55, "della_linear": 0.55}.get(method, 1.0)
    out = merge_states(method, base, models, params=params, model_params=_weights(method, 3))
    for k in base:
        assert torch.isfinite(out[k]).all()
        assert not torch.equal(out[k], base[k]), (method, k)
        if method in SPECTRAL and k in MATRICES:
            # A spectral merge moves mass between entries, so the bound is on the whole matrix:
            # |Iso-C|_F = mean(S) sqrt(r) <= |sum_i w_i delta_i|_F, |TSV-M|_F <= |[S_1,k .. S_T,k]|_2,
            # |Iso-CTS|_F <= |[S_k, S_t,s ...]|_2 <= sqrt(2) sum_i |w_i delta_i|_F.
            reach_f = sum(float(torch.linalg.norm(d[k])) / 3 for d in deltas) * (2**0.5 if method == "iso_cts" else 1.0)
            assert float(torch.linalg.norm(out[k] - base[k])) <= reach_f + 1e-5, (method, k)
            continue
        reach = sum(d[k].abs() for d in deltas) / p_min
        assert ((out[k] - base[k]).abs() <= reach + 1e-5).all(), (method, k)


def test_linear_half_half_is_the_mean():
    a, b = _state(1), _state(2)
    out = merge_states("linear", _state(0), [a, b], model_params=[{"weight": 0.5}, {"weight": 0.5}])
    for k in a:
        assert torch.allclose(out[k], (a[k] + b[k]) / 2, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "method, params, model_params, field",
    [
        ("ties", {"density": 1.5}, None, "density"),
        ("ties", {"consensus": "max"}, None, "consensus"),
        ("ties", {"densty": 0.5}, None, "densty"),
        ("dare_ties", {"rescale_mode": "l2"}, None, "rescale_mode"),
        ("della", {"density": 0.1, "epsilon": 0.2}, None, "epsilon"),
        ("breadcrumbs", {}, [{"gamma": -0.1}, {}], "gamma"),
        ("dare_linear", {}, [{}, {"density": "high"}], "models[1].parameters.density"),
        ("slerp", {"t": -0.1}, None, "parameters.t"),
        ("hierarchical", {"reference": 2}, None, "reference"),
        ("hierarchical", {"alignment": "ot"}, None, "alignment"),
        ("hierarchical", {}, [{"weight": -1.0}, {}], "weight"),
    ],
)
def test_bad_parameters_raise_strategy_error_naming_the_field(method, params, model_params, field):
    with pytest.raises(StrategyError) as err:
        build_strategy(method, params, model_params or [{}, {}])
    assert field in str(err.value)


@pytest.mark.parametrize("method", ALL)
def test_bfloat16_compute_matches_float32(method):
    # The engine may compute in bf16 (MergeSpec.dtype): same result, up to bf16 rounding.
    base = _state(0)
    # Inputs exactly representable in bf16, so both runs rank the same magnitudes.
    models = [{k: base[k] + d[k] for k in base} for d in (_state(20, 0.125), _state(21, 0.125))]
    params = {"density": 0.6} if "density" in build_strategy(method, {}, [{}, {}]).PerModel.model_fields else {}
    full = merge_states(method, base, models, params=params)
    strategy = build_strategy(method, params, [{}, {}])
    from fedmerge.merging.strategies import TensorContext

    for k in base:
        b16 = base[k].bfloat16()
        ds = [(m[k] - base[k]).bfloat16() for m in models]
        out = strategy.merge_tensor(TensorContext(k, strategy.model_params, 0), b16, ds)
        assert out.dtype == torch.bfloat16 and out.shape == base[k].shape
        assert torch.allclose(out.float(), full[k], atol=0.05), (method, k)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_are_reproducible_whatever_the_visiting_order(method):
    base = _state(0)
    models = [{k: base[k] + d[k] for k in base} for d in (_state(30, 0.1), _state(31, 0.1))]
    p = {"density": 0.5, "epsilon": 0.1} if method.startswith("della") else {"density": 0.5}
    a = merge_states(method, base, models, p, seed=3)
    reordered = dict(reversed(list(base.items())))  # the engine may visit tensors in any order
    b = merge_states(method, reordered, models, p, seed=3)
    c = merge_states(method, base, models, p, seed=4)
    for k in base:
        assert torch.equal(a[k], b[k]), k  # same seed: same bytes
    assert any(not torch.equal(a[k], c[k]) for k in base)  # another seed: other masks
