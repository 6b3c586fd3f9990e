"""mergekit-format features beyond the example files: parameter precedence, DARE/DELLA rescaling,
tokenizers and chat templates, MODEL+ADAPTER, mergekit-multi documents, refusals.

Expected weights are computed in the tests (``mergekit_reference``); mergekit is not installed.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from engine_helpers import tensors
from mergekit_reference import layer_of, linear, slerp, t_of, task_arithmetic, ties, value

from fedmerge.cli import main
from fedmerge.merging.mergeconfig import MergeConfigError
from fedmerge.merging.multimerge import load_documents
from fedmerge.toymodels import TinyMistralSpec, build_tiny_mistral, perturb_checkpoint

SPEC6 = TinyMistralSpec(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """base, a, b, c: 6-layer float32 models; chat: b with two new special tokens (ChatML) whose rows
    it trained, and a chat template."""
    from transformers import AutoTokenizer

    from fedmerge.checkpoints import CheckpointWriter

    root = tmp_path_factory.mktemp("mk-six")
    base = build_tiny_mistral(root / "base", SPEC6, seed=0)
    out = {"base": base, "root": root}
    for i, name in enumerate("abc"):
        out[name] = perturb_checkpoint(base, root / name, seed=10 + i, scale=0.05)
    chat = root / "chat"
    ts = tensors(out["b"])
    gen = torch.Generator().manual_seed(99)
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        ts[n][300:302] = torch.randn(2, ts[n].shape[1], generator=gen) * 0.05
    with CheckpointWriter(chat) as w:
        for n, t in ts.items():
            w.add(n, t)
        w.commit(sidecars_from=out["b"])
    tok = AutoTokenizer.from_pretrained(chat)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(chat)
    assert tok.convert_tokens_to_ids("<|im_start|>") == 300
    out["chat"] = chat
    return out


def _merge(tmp_path, six, text, name="m.yml", out="out", extra=()):
    cfg = tmp_path / name
    cfg.write_text(text.format(**{k: str(v) for k, v in six.items()}))
    rc = main(["merge", str(cfg), str(tmp_path / out), "--no-progress", *extra])
    return rc, tmp_path / out


def _close(got, expected, atol=1e-5):
    assert set(got) == set(expected)
    for n in expected:
        torch.testing.assert_close(got[n].float(), expected[n], rtol=0, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


# -- parameters --------------------------------------------------------------------------------------
PRECEDENCE = """
merge_method: ties
base_model: {base}
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 3]}}
      - {{model: {a}, layer_range: [0, 3], parameters: {{weight: 0.7}}}}
      - {{model: {b}, layer_range: [0, 3]}}
    parameters: {{density: 0.4, normalize: false}}
  - sources:
      - {{model: {base}, layer_range: [3, 6]}}
      - {{model: {a}, layer_range: [3, 6]}}
      - {{model: {b}, layer_range: [3, 6], parameters: {{density: [0.2, 0.9]}}}}
parameters:
  weight: 0.5
  density: 0.6
  normalize: true
dtype: float32
"""


def test_source_then_slice_then_global_parameters(six, tmp_path):
    """Per-slice parameters (refused before) and per-source ones override the top level, per layer."""
    rc, out = _merge(tmp_path, six, PRECEDENCE)
    assert rc == 0
    b, a, bb = tensors(six["base"]), tensors(six["a"]), tensors(six["b"])
    expected = {}
    for n in b:
        j = layer_of(n)
        first = j is None and "embed" in n or j is not None and j < 3
        if first:  # slice 0 (and the embeddings, which take the first slice's parameters) at t = j / 2
            expected[n] = ties(b[n], [(a[n], 0.7, 0.4), (bb[n], 0.5, 0.4)], normalize=False)
        else:  # slice 1 (and the final norm / head, which take the last slice's, with t = 0)
            t = (j - 3) / 2 if j is not None else 0.0
            expected[n] = ties(b[n], [(a[n], 0.5, 0.6), (bb[n], 0.5, value([0.2, 0.9], n, t))], normalize=True)
    _close(tensors(out), expected)


FILTER_FALLTHROUGH = """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters:
      weight:
        - filter: self_attn
          value: [0.0, 1.0]
  - model: {b}
parameters:
  weight: 0.25
  lambda: 0.8
dtype: float32
"""


def test_a_filter_that_matches_nothing_falls_through_to_the_next_level(six, tmp_path):
    rc, out = _merge(tmp_path, six, FILTER_FALLTHROUGH)
    assert rc == 0
    b, a, bb = tensors(six["base"]), tensors(six["a"]), tensors(six["b"])
    expected = {}
    for n in b:
        wa = value([{"filter": "self_attn", "value": [0.0, 1.0]}], n, t_of(n, 6))
        expected[n] = task_arithmetic(b[n], [(a[n], 0.25 if wa is None else wa), (bb[n], 0.25)], lam=0.8)
    _close(tensors(out), expected)


def _ratio_of_kept(out, base, model, name):
    """Drop rate and the scale of the kept entries: (out - base) / (model - base) where kept."""
    d = model[name].float() - base[name].float()
    got = out[name].float() - base[name].float()
    kept = got != 0
    return 1 - kept.float().mean().item(), (got[kept] / d[kept]), kept, d


RESCALE_MERGEKIT = """
merge_method: METHOD
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0, density: DENSITY}}
  - model: {b}
    parameters: {{weight: 0.0, density: DENSITY}}
dtype: float32
"""


RESCALE_FEDMERGE = """
method: METHOD
base: {base}
models:
  - path: {a}
    parameters: {{weight: 1.0, density: DENSITY}}
  - path: {b}
    parameters: {{weight: 0.0, density: DENSITY}}
"""


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_mergekit_rescales_to_the_l1_norm_fedmerge_format_by_the_keep_probability(six, tmp_path, method):
    """The same recipe in both formats: same drop rate; mergekit's rescale restores the L1 norm
    (one factor for the tensor), fedmerge's divides by the keep probability (1/p for DARE)."""
    density = 0.3
    rc, mk = _merge(
        tmp_path,
        six,
        RESCALE_MERGEKIT.replace("METHOD", method).replace("DENSITY", str(density)),
        out="mk",
    )
    assert rc == 0
    rc, fm = _merge(
        tmp_path,
        six,
        RESCALE_FEDMERGE.replace("METHOD", method).replace("DENSITY", str(density)),
        name="f.yml",
        out="fm",
    )
    assert rc == 0
    b, a = tensors(six["base"]), tensors(six["a"])
    name = "model.embed_tokens.weight"  # 303 x 16: enough entries for a drop rate
    for folder in (mk, fm):
        drop, ratio, kept, d = _ratio_of_kept(tensors(folder), b, a, name)
        n = d.numel()
        assert abs(drop - (1 - density)) < 4 * (density * (1 - density) / n) ** 0.5  # binomial, 4 sigma
    got = tensors(mk)[name] - b[name]
    _, _, kept, d = _ratio_of_kept(tensors(mk), b, a, name)
    l1 = d.abs().sum() / d[kept].abs().sum()
    torch.testing.assert_close(got[kept], d[kept] * l1, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.abs().sum(), d.abs().sum(), rtol=1e-5, atol=0)  # the L1 norm is restored
    if method == "dare_linear":
        got = tensors(fm)[name] - b[name]
        _, _, kept, d = _ratio_of_kept(tensors(fm), b, a, name)
        torch.testing.assert_close(got[kept], d[kept] / density, rtol=0, atol=1e-6)


# -- tokenizers and chat templates ---------------------------------------------------------------------
LINEAR_BASE_CHAT = """
merge_method: linear
base_model: {base}
models:
  - model: {base}
    parameters: {{weight: 0.5}}
  - model: {chat}
    parameters: {{weight: 0.5}}
dtype: float32
"""

TOKENIZER_UNION = LINEAR_BASE_CHAT + "tokenizer_source: union\n"
TOKENIZER_BASE = LINEAR_BASE_CHAT + "tokenizer_source: base\n"
TOKENIZER_FROM_MODEL_CHAT_TEMPLATE_AUTO = LINEAR_BASE_CHAT + "tokenizer_source: {chat}\nchat_template: auto\n"
TOKENIZER_TOKENS = LINEAR_BASE_CHAT + """tokenizer:
  source: union
  pad_to_multiple_of: 16
  tokens:
    "<s>":
      source: {chat}
      force: true
    "<pad>":
      source: {{kind: zero}}
      force: true
    "<|im_end|>":
      source: {{kind: model_token, model: {base}, token: "</s>"}}
    "<|im_start|>":
      source: {{kind: model_token, model: {base}, token_id: 2}}
"""
CHAT_TEMPLATE_LITERAL = LINEAR_BASE_CHAT.replace("{chat}", "{a}") + 'chat_template: "{{% for m in messages %}}[{{{{ m.content }}}}]{{% endfor %}}"\n'


def _tok(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_tokenizer_union_adds_the_tokens_only_one_model_has(six, tmp_path):
    rc, out = _merge(tmp_path, six, TOKENIZER_UNION)
    assert rc == 0
    tok = _tok(out)
    vocab = tok.get_vocab()
    assert len(vocab) == 302 and json.loads((out / "config.json").read_text())["vocab_size"] == 302
    b, c = tensors(six["base"]), tensors(six["chat"])
    got = tensors(out)
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[n].shape == (302, 16)
        # tokens both have: the merge of their own rows (same ids: chat extends the base's tokenizer)
        torch.testing.assert_close(got[n][:300], 0.5 * b[n][:300] + 0.5 * c[n][:300], rtol=0, atol=1e-6)
        # tokens only chat has: its row for both models, so the merge keeps it
        for t in ("<|im_start|>", "<|im_end|>"):
            torch.testing.assert_close(got[n][vocab[t]], c[n][300 + ["<|im_start|>", "<|im_end|>"].index(t)], rtol=0, atol=1e-6)
    torch.testing.assert_close(got["model.norm.weight"], 0.5 * b["model.norm.weight"] + 0.5 * c["model.norm.weight"], rtol=0, atol=1e-6)
    ids = tok("<|im_start|>user", add_special_tokens=False).input_ids
    assert ids[0] == vocab["<|im_start|>"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape == (302, 16)


def test_tokenizer_base_keeps_the_base_vocabulary(six, tmp_path):
    rc, out = _merge(tmp_path, six, TOKENIZER_BASE)
    assert rc == 0
    got, b, c = tensors(out), tensors(six["base"]), tensors(six["chat"])
    # as mergekit: the embedding has one row per token of the tokenizer (300), so padding rows go
    assert got["lm_head.weight"].shape == (300, 16) and json.loads((out / "config.json").read_text())["vocab_size"] == 300
    torch.testing.assert_close(got["lm_head.weight"], 0.5 * b["lm_head.weight"][:300] + 0.5 * c["lm_head.weight"][:300], rtol=0, atol=1e-6)
    assert "<|im_start|>" not in _tok(out).get_vocab()


def test_tokenizer_tokens_force_zero_and_model_token_rows_and_padding(six, tmp_path):
    """README shape: tokenizer: {source, tokens: {T: {source, force}}, pad_to_multiple_of}."""
    rc, out = _merge(tmp_path, six, TOKENIZER_TOKENS)
    assert rc == 0
    got, b, c = tensors(out), tensors(six["base"]), tensors(six["chat"])
    vocab = _tok(out).get_vocab()
    n = "model.embed_tokens.weight"
    assert got[n].shape == (304, 16)  # 302 tokens, padded to a multiple of 16
    torch.testing.assert_close(got[n][vocab["<s>"]], c[n][0], rtol=0, atol=1e-6)  # forced: chat's row for both
    assert torch.equal(got[n][vocab["<pad>"]], torch.zeros(16))
    # chat has <|im_end|> itself (not forced); the base gets its own </s> row for it
    torch.testing.assert_close(got[n][vocab["<|im_end|>"]], 0.5 * b[n][1] + 0.5 * c[n][301], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[n][vocab["<|im_start|>"]], 0.5 * b[n][2] + 0.5 * c[n][300], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[n][302:], got[n][:302].mean(0).expand(2, 16), rtol=0, atol=1e-6)


def test_tokenizer_from_a_model_and_chat_templates(six, tmp_path):
    rc, out = _merge(tmp_path, six, TOKENIZER_FROM_MODEL_CHAT_TEMPLATE_AUTO)
    assert rc == 0
    tok = _tok(out)
    assert len(tok.get_vocab()) == 302 and tok.chat_template == CHAT_TEMPLATE
    rc, out2 = _merge(tmp_path, six, CHAT_TEMPLATE_LITERAL, name="t.yml", out="out2")
    assert rc == 0
    tok = _tok(out2)
    assert tok.chat_template == "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[hi]"
    assert len(tok.get_vocab()) == 300  # the base's tokenizer, with the template


# -- MODEL+ADAPTER -----------------------------------------------------------------------------------
MODEL_PLUS_ADAPTER = """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}+ADAPTER
    parameters: {{weight: 0.6}}
  - model: {b}
    parameters: {{weight: 0.4}}
dtype: float32
"""


def test_model_plus_lora_adapter_is_peft_merge_and_unload(six, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(six["a"], dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "a-merged", safe_serialization=True)
    rc, out = _merge(
        tmp_path,
        six,
        MODEL_PLUS_ADAPTER.replace("ADAPTER", str(tmp_path / "adapter")),
    )
    assert rc == 0
    b, m, bb = tensors(six["base"]), tensors(tmp_path / "a-merged"), tensors(six["b"])
    assert not torch.equal(m["model.layers.2.mlp.down_proj.weight"], tensors(six["a"])["model.layers.2.mlp.down_proj.weight"])
    _close(tensors(out), {n: task_arithmetic(b[n], [(m[n], 0.6), (bb[n], 0.4)]) for n in b})
    meta = json.loads((out / "fedmerge.json").read_text())
    assert meta["inputs"][0]["kind"] == "model+lora" and meta["inputs"][0]["adapter"] == str(tmp_path / "adapter")


# -- several documents ---------------------------------------------------------------------------------
MULTI = """name: first-merge
merge_method: linear
models:
  - model: {a}
  - model: {b}
parameters:
  weight: 0.5
---
name: second-merge
merge_method: slerp
base_model: first-merge
models:
  - model: {c}
parameters:
  t: 0.5
---
merge_method: task_arithmetic
base_model: {base}
models:
  - model: second-merge
    parameters:
      weight: 0.5
  - model: {a}
    parameters:
      weight: 0.5
dtype: float32
"""


def test_multi_document_file_runs_in_order_and_names_earlier_outputs(six, tmp_path, capsys):
    rc, out = _merge(tmp_path, six, MULTI)
    assert rc == 0
    inter = tmp_path / "out-intermediates"
    assert sorted(p.name for p in inter.iterdir()) == ["first-merge", "second-merge"]
    b, a, bb, c = (tensors(six[k]) for k in ("base", "a", "b", "c"))
    first = {n: linear([(a[n], 0.5), (bb[n], 0.5)]) for n in b}
    second = {n: slerp(0.5, first[n], c[n]) for n in b}
    _close(tensors(inter / "second-merge"), second)
    _close(tensors(out), {n: task_arithmetic(b[n], [(second[n], 0.5), (a[n], 0.5)]) for n in b})
    for folder, text in ((inter / "first-merge", MULTI.split("---")[0]), (out, MULTI.split("---")[2])):
        assert (folder / "merge_config.yaml").read_text().strip() == text.format(**{k: str(v) for k, v in six.items()}).strip()
    assert json.loads((inter / "second-merge" / "fedmerge.json").read_text())["merge_name"] == "second-merge"
    capsys.readouterr()
    # run again: the existing final output is refused before anything runs
    before = (inter / "first-merge" / "model.safetensors").stat().st_mtime_ns
    rc, _ = _merge(tmp_path, six, MULTI)
    captured = capsys.readouterr()
    assert rc == 1 and "already exists" in captured.err and "reused" not in captured.out
    # without it, the intermediate merges are reused and only the final one runs
    shutil.rmtree(out)
    rc, _ = _merge(tmp_path, six, MULTI)
    captured = capsys.readouterr()
    assert rc == 0 and captured.out.count("already holds this merge; reused") == 2 and (out / "model.safetensors").exists()
    assert (inter / "first-merge" / "model.safetensors").stat().st_mtime_ns == before
    # a changed recipe does not silently reuse an output made from the old one
    shutil.rmtree(out)
    rc, _ = _merge(tmp_path, six, MULTI.replace("weight: 0.5\n---", "weight: 0.4\n---", 1))
    assert rc == 1 and "exists but was made from another recipe; pass --overwrite" in capsys.readouterr().err


def test_multi_document_errors(six, tmp_path):
    cycle = tmp_path / "cycle.yml"
    cycle.write_text(f"name: x\nmerge_method: linear\nmodels: [{{model: y, parameters: {{weight: 1}}}}, {{model: {six['a']}, parameters: {{weight: 1}}}}]\n---\nname: y\nmerge_method: linear\nmodels: [{{model: x, parameters: {{weight: 1}}}}, {{model: {six['a']}, parameters: {{weight: 1}}}}]\n")
    with pytest.raises(MergeConfigError, match="cycle: x -> y -> x"):
        load_documents(cycle, tmp_path / "out")
    two = tmp_path / "two.yml"
    two.write_text(f"merge_method: linear\nmodels: [{{model: {six['a']}}}]\n---\nmerge_method: linear\nmodels: [{{model: {six['b']}}}]\n")
    with pytest.raises(MergeConfigError, match=f"{two} \\(document 2\\): more than one document has no name"):
        load_documents(two, tmp_path / "out")
    bad = tmp_path / "bad.yml"
    bad.write_text(f"name: x\nmerge_method: linear\nmodels: [{{model: {six['a']}}}]\n---\nmerge_method: ties\nbase_model: {six['base']}\nmodels: [{{model: x, parameters: {{densty: 1}}}}]\n")
    with pytest.raises(MergeConfigError, match=f"{bad} \\(document 2\\): models\\[0\\].parameters.densty: not a parameter of ties; did you mean 'density'"):
        load_documents(bad, tmp_path / "out")


# -- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1, lambda: 2}}\n",
         "models\\[0\\].parameters.lambda: lambda is a global parameter of ties .*set it under the top-level parameters"),
        ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1, densty: 0.5}}\n",
         "models\\[0\\].parameters.densty: not a parameter of ties; did you mean 'density'"),
        ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{density: 0.5}}\n",
         "models\\[0\\]: '.*a' has no weight for tensor 'model.embed_tokens.weight'; mergekit's ties requires one"),
        ("merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n",
         "base_model: '.*base' is not listed under models, so mergekit's linear adds it as one more input, and that input has no weight"),
        ("merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}}}]\nparameters:\n  t: {{filter: mlp, value: 0.5}}\n",
         "parameters: t: a single \\{filter, value\\} mapping is not a parameter value"),
        ("merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\nparameters: {{t: 0.5}}\n",
         "models: slerp merges exactly two models, the base and one other; this slice has 3 \\(base_model included\\)"),
        ("merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}}}]\n", "parameters.t: slerp needs t"),
        ("merge_method: passthrough\nslices:\n  - sources:\n    - {{model: {a}, layer_range: [0, 2]}}\n    - {{model: {b}, layer_range: [0, 2]}}\n",
         "slices\\[0\\]: passthrough copies one model per slice, this slice has 2"),
        ("merge_method: passthrough\nslices:\n  - sources:\n    - {{model: {a}, layer_range: [4, 9]}}\n", "slices\\[0\\].sources\\[0\\].layer_range: \\[4, 9\\] goes past the last layer"),
        ("merge_method: linear\nslices:\n  - sources:\n    - {{model: {a}, layer_range: [0, 2], parameters: {{weight: 1}}}}\n    - {{model: {b}, layer_range: [0, 3], parameters: {{weight: 1}}}}\n",
         "slices\\[0\\].sources: every source of a slice must span the same number of layers"),
        ("merge_method: linear\nmodels: [{{model: {a}}}]\nmodules: {{text: {{models: []}}}}\n", "modules: per-module recipes .* are not supported"),
        ("merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\ntokenizer_source: base\ntokenizer: {{source: union}}\n", "tokenizer_source and tokenizer: give one of them"),
        ("merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\nchat_template: chatml\n", "chat_template: 'chatml' is neither 'auto' nor a Jinja template; fedmerge ships no named templates"),
        ("merge_method: linear\nmodels: [{{model: {a}+{b}, parameters: {{weight: 1}}}}]\n", "models\\[0\\].model: .* is not a PEFT adapter folder"),
        ("merge_method: linear\nmodels: [{{model: mistralai/Mistral-7B-v0.1, parameters: {{weight: 1}}}}]\n", "models\\[0\\].model: 'mistralai/Mistral-7B-v0.1' does not exist .*never downloads"),
        ("merge_method: della\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 1, density: 0.9, epsilon: 0.1}}}}, {{model: {b}, parameters: {{weight: 1}}}}]\n",
         "density 0.9 \\+/- epsilon 0.1 must lie strictly inside \\(0, 1\\)"),
        ("merge_method: ties\nbase_model: {base}\nslices:\n  - sources:\n    - {{model: {a}, layer_range: [0, 6], parameters: {{weight: 1}}}}\n",
         "slices\\[0\\]: base_model '.*base' is not among this slice's sources; ties takes the base's layers from the slice"),
        ("merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\nmerge_methd: ties\n", "merge_methd: not a mergekit config key; did you mean 'merge_method'"),
    ],
)
def test_refusals_name_the_file_and_key(six, tmp_path, capsys, text, message):
    rc, out = _merge(tmp_path, six, text)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"{tmp_path / 'm.yml'}" in err
    import re

    assert re.search(message, err), err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


TIES_BASE_ONLY_SLICE = """
merge_method: ties
base_model: {base}
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 3]}}
      - {{model: {a}, layer_range: [0, 3], parameters: {{weight: 1.0, density: 0.5}}}}
      - {{model: {b}, layer_range: [0, 3], parameters: {{weight: 0.5, density: 0.5}}}}
  - sources:
      - {{model: {base}, layer_range: [3, 6]}}
dtype: float32
"""


def test_a_ties_slice_of_only_the_base_copies_the_base(six, tmp_path):
    """A slice whose only source is the base: mergekit returns the base's layers unchanged."""
    rc, out = _merge(tmp_path, six, TIES_BASE_ONLY_SLICE)
    assert rc == 0
    b, a, bb, got = tensors(six["base"]), tensors(six["a"]), tensors(six["b"]), tensors(out)
    for n in b:
        j = layer_of(n)
        if j is not None and j >= 3 or j is None and "embed" not in n:
            assert torch.equal(got[n], b[n]), n
        else:
            torch.testing.assert_close(got[n], ties(b[n], [(a[n], 1.0, 0.5), (bb[n], 0.5, 0.5)], normalize=True), rtol=0, atol=1e-5)


PASSTHROUGH_SHALLOWER = """
merge_method: passthrough
slices:
  - sources:
      - {{model: {a}, layer_range: [0, 2]}}
  - sources:
      - {{model: COPY, layer_range: [0, 2]}}
"""


def test_passthrough_stacks_layers_into_a_shallower_model(six, tmp_path):
    shutil.copytree(six["a"], tmp_path / "delta-ish")
    rc, out = _merge(
        tmp_path,
        six,
        PASSTHROUGH_SHALLOWER.replace("COPY", str(tmp_path / "delta-ish")),
    )
    assert rc == 0  # a full model may: its layers 0-1 become output layers 2-3
    got, d = tensors(out), tensors(tmp_path / "delta-ish")
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], d["model.layers.1.mlp.up_proj.weight"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


PASSTHROUGH_SCALE = """
merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - filter: down_proj
              value: 0.5
            - value: 1.0
  - sources:
      - model: {b}
        layer_range: [2, 6]
dtype: float32
"""


def test_passthrough_scale_by_filter(six, tmp_path):
    """mergekit's passthrough with a per-source scale: here halving o_proj and down_proj only."""
    rc, out = _merge(tmp_path, six, PASSTHROUGH_SCALE)
    assert rc == 0
    a, bb, got = tensors(six["a"]), tensors(six["b"]), tensors(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 8
    for n, t in got.items():
        j = layer_of(n)
        if j is None:
            src = a[n] if "embed" in n else bb[n]
        elif j < 4:
            src = a[n] * (0.5 if ("o_proj" in n or "down_proj" in n) else 1.0)
        else:
            src = bb[n.replace(f".layers.{j}.", f".layers.{j - 4 + 2}.")]
        assert torch.equal(t, src), n
