"""Run a strategy over whole state dicts the way the engine does, without files (strategy tests)."""

from __future__ import annotations

from fedmerge.merging.strategies import TensorContext, build_strategy

# A tiny Mistral with grouped-query attention: 8 query heads share 2 KV heads (groups of 4).
TINY_GQA = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)


def merge_states(method: str, base: dict, models: list[dict], params: dict | None = None, model_params: list | None = None, config: dict | None = None, seed: int = 0) -> dict:
    """Merge state dicts with ``method``; deltas are taken in float32 as the engine does."""
    strategy = build_strategy(method, params or {}, model_params or [{}] * len(models))
    config = config or {}
    out = {}
    for group in strategy.groups(list(base), config):
        contexts = [TensorContext(name, strategy.model_params, seed, config=config) for name in group]
        bases = [base[name].float() for name in group]
        deltas = [[m[name].float() - base[name].float() for m in models] for name in group]
        if len(group) == 1:
            merged = [strategy.merge_tensor(contexts[0], bases[0], deltas[0])]
        else:
            merged = strategy.merge_group(contexts, bases, deltas)
        out.update(zip(group, merged))
    return out


def tiny_gqa_model(seed: int):
    """A randomly initialised tiny MistralForCausalLM (8 heads / 2 KV heads) and its config dict."""
    import torch
    from transformers import MistralForCausalLM

    from fedmerge.toymodels import TinyMistralSpec, mistral_config

    cfg = mistral_config(TinyMistralSpec(**TINY_GQA))
    torch.manual_seed(seed)
    model = MistralForCausalLM(cfg).eval()
    return model, cfg


def logits_of(cfg, state: dict, ids):
    """Logits of a MistralForCausalLM built from ``cfg`` carrying ``state``."""
    import torch
    from transformers import MistralForCausalLM

    model = MistralForCausalLM(cfg).eval()
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    with torch.no_grad():
        return model(ids).logits


def state_of(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
