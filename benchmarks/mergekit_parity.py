"""Weight parity with mergekit 0.1.5: the same mergekit-format YAML through ``mergekit-yaml`` and
``fedmerge merge``, every output tensor compared.

The configs are the ones the tests run (the YAML constants of
``tests/merging/test_mergekit_examples.py`` and ``tests/merging/test_mergekit_features.py``, with
the zoo's paths formatted in and ``dtype: float16`` turned into ``float32`` so a 1e-5 tolerance
means something), plus one plain recipe per method. The zoo is tiny and seeded: a 40-layer Mistral
(as deep as the examples' 13B Llamas, so their layer ranges stay as written) with four
fine-tunes, and the features tests' 6-layer base with three fine-tunes, a ChatML variant and a
LoRA adapter. It is built once under ``${FEDMERGE_CACHE:-~/.cache/fedmerge}/parity/``; the
mergekit environment is the one ``benchmarks/mergekit_compare.py`` makes (made here when
missing).

    .venv/bin/python benchmarks/mergekit_parity.py [--only TIES,plain/ties] [--json out.json]

Deterministic methods pass when both outputs hold the same tensor names, every tensor agrees to
``--atol`` (1e-5), the model config agrees (layers, widths, vocabulary, dtype) and so does the
tokenizer (vocabulary, chat template). Random methods (``dare_*``, ``della*``) draw different
masks in each tool, so their recipes let one model's task vector through alone and the check is
statistical: per tool, the fraction of that delta's entries left at the base (the drop rate) is
compared with ``1 - density`` (binomial z-score over all entries, and the worst tensor's), and
the L1 norm of the kept delta with the original's (``rescale``). A tool that refuses or fails is
recorded with its last line of output.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests" / "merging"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from benchmarks.mergekit_compare import MERGEKIT, ensure_mergekit, venv_dir  # noqa: E402

RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")
CONFIG_KEYS = ("architectures", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
FINETUNES40 = ("orca", "platypus", "wizardlm", "wizardmath")
ZOO_VERSION = 1


@dataclass
class Case:
    name: str
    text: str  # the YAML, paths formatted in
    method: str
    drop_from: str | None = None  # random methods: the one model whose delta passes (zoo key)
    density: float | None = None
    epsilon: float | None = None  # DELLA: keep probabilities spread over density +/- epsilon by rank
    multi: bool = False  # several documents: mergekit-multi


@dataclass
class Outcome:
    ok: bool
    message: str = ""
    seconds: float = 0.0


@dataclass
class Row:
    case: Case
    mergekit: Outcome
    fedmerge: Outcome
    checks: dict = field(default_factory=dict)
    verdict: str = ""
    mergekit_tensors: int = 0


# -- the zoo -----------------------------------------------------------------------------------------
class Zoo:
    """The seeded models, built once into a folder named after what they are made of."""

    def __init__(self, root: Path):
        from test_mergekit_examples import SPEC40
        from test_mergekit_features import CHAT_TEMPLATE, SPEC6

        self.spec40, self.spec6, self.chat_template = SPEC40, SPEC6, CHAT_TEMPLATE
        key = hashlib.sha256(repr((ZOO_VERSION, SPEC40, SPEC6, CHAT_TEMPLATE)).encode()).hexdigest()[:12]
        self.dir = root / f"zoo-{key}"

    def paths(self) -> dict[str, dict[str, Path]]:
        forty = {"base": self.dir / "forty" / "llama2-13b", **{k: self.dir / "forty" / k for k in FINETUNES40}}
        six = {k: self.dir / "six" / k for k in ("base", "a", "b", "c", "chat", "a-copy", "a-lora")}
        return {"forty": forty, "six": six}

    def ensure(self) -> dict[str, dict[str, Path]]:
        if not self.dir.exists():
            tmp = self.dir.with_name(f".{self.dir.name}.partial-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            self._build(tmp)
            tmp.rename(self.dir)  # atomic: a zoo folder that exists is complete
        return self.paths()

    def _build(self, into: Path) -> None:
        from fedmerge.toymodels import build_tiny_mistral, perturb_checkpoint

        print(f"building the parity zoo in {self.dir}", flush=True)
        _quiet_libraries()
        base = build_tiny_mistral(into / "forty" / "llama2-13b", self.spec40, seed=0)
        for i, name in enumerate(FINETUNES40):
            perturb_checkpoint(base, into / "forty" / name, seed=i + 1, scale=0.05)
        six = into / "six"
        base6 = build_tiny_mistral(six / "base", self.spec6, seed=0)
        for i, name in enumerate("abc"):
            perturb_checkpoint(base6, six / name, seed=10 + i, scale=0.05)
        shutil.copytree(six / "a", six / "a-copy")
        self._chat_variant(six / "b", six / "chat")
        self._lora(six / "a", six / "a-lora")

    def _chat_variant(self, src: Path, out: Path) -> None:
        """``src`` with two ChatML special tokens whose embedding and head rows it trained, and a
        chat template (as the features tests' ``chat`` model)."""
        import torch
        from transformers import AutoTokenizer

        from fedmerge.checkpoints import CheckpointReader, CheckpointWriter

        gen = torch.Generator().manual_seed(99)
        with CheckpointReader(src) as reader, CheckpointWriter(out) as writer:
            for name in reader.names():
                t = reader.get(name).clone()
                if name in ("model.embed_tokens.weight", "lm_head.weight"):
                    t[300:302] = torch.randn(2, t.shape[1], generator=gen) * 0.05
                writer.add(name, t)
            writer.commit(sidecars_from=src)
        tok = AutoTokenizer.from_pretrained(out)
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = self.chat_template
        tok.save_pretrained(out)

    @staticmethod
    def _lora(model_dir: Path, out: Path) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(3)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        lora = LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
        get_peft_model(model, lora).save_pretrained(out)


def _quiet_libraries() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


# -- the configs -------------------------------------------------------------------------------------
def _fmt(text: str, paths: dict[str, Path]) -> str:
    return text.format(**{k: str(v) for k, v in paths.items()}).replace("dtype: float16", "dtype: float32")


def example_cases(forty: dict[str, Path]) -> list[Case]:
    import test_mergekit_examples as ex

    out = []
    for name in ("TIES", "BIO", "GRADIENT_SLERP", "LINEAR", "FRANKEN", "BREADCRUMBS_TIES", "SLERP_SCALAR"):
        text = _fmt(getattr(ex, name), forty)
        out.append(Case(f"examples/{name}", text, _method_of(text)))
    return out


def feature_cases(six: dict[str, Path]) -> list[Case]:
    import test_mergekit_features as ft

    fmt = {k: v for k, v in six.items() if "-" not in k}  # str.format names: the templates' own keys
    out = []
    for name in (
        "PRECEDENCE", "FILTER_FALLTHROUGH", "TOKENIZER_UNION", "TOKENIZER_BASE", "TOKENIZER_TOKENS",
        "TOKENIZER_FROM_MODEL_CHAT_TEMPLATE_AUTO", "CHAT_TEMPLATE_LITERAL", "TIES_BASE_ONLY_SLICE", "PASSTHROUGH_SCALE",
    ):
        text = _fmt(getattr(ft, name), fmt)
        out.append(Case(f"features/{name}", text, _method_of(text)))
    out.append(Case("features/PASSTHROUGH_SHALLOWER", _fmt(ft.PASSTHROUGH_SHALLOWER, fmt).replace("COPY", str(six["a-copy"])), "passthrough"))
    out.append(Case("features/MODEL_PLUS_ADAPTER", _fmt(ft.MODEL_PLUS_ADAPTER, fmt).replace("ADAPTER", str(six["a-lora"])), "task_arithmetic"))
    out.append(Case("features/MULTI", _fmt(ft.MULTI, fmt), "linear > slerp > task_arithmetic", multi=True))
    for method in ("dare_linear", "della_linear"):  # the test's density
        text = _fmt(ft.RESCALE_MERGEKIT, fmt).replace("METHOD", method).replace("DENSITY", "0.3")
        eps = 0.15 if method.startswith("della") else None  # both tools' default epsilon
        out.append(Case(f"features/RESCALE_MERGEKIT[{method}]", text, method, drop_from="a", density=0.3, epsilon=eps))
    return out


# One recipe per method on the 40-layer zoo (mergekit-format parameters). Random methods merge a
# single fine-tune, so the drop rate of its delta can be read off the output.
PLAIN = {
    "linear": ("", "{weight: 0.5}|{weight: 0.3}|{weight: 0.2}", ""),
    "task_arithmetic": ("base", "{weight: 0.5}|{weight: 0.3}|{weight: 0.7}", "parameters: {lambda: 0.9}\n"),
    "ties": ("base", "{weight: 0.5, density: 0.5}|{weight: 0.3, density: 0.7}|{weight: 0.7, density: 0.3}", ""),
    "breadcrumbs": ("base", "{weight: 0.5, density: 0.8, gamma: 0.1}|{weight: 0.3, density: 0.7, gamma: 0.1}|{weight: 0.7, density: 0.9, gamma: 0.2}", ""),
    "breadcrumbs_ties": ("base", "{weight: 0.5, density: 0.8, gamma: 0.1}|{weight: 0.3, density: 0.7, gamma: 0.1}|{weight: 0.7, density: 0.9, gamma: 0.2}", ""),
    "model_stock": ("base", "||", ""),
    "slerp": ("base", "", "parameters: {t: 0.4}\n"),
    "dare_ties": ("base", "{weight: 1.0, density: 0.5}", ""),
    "dare_linear": ("base", "{weight: 1.0, density: 0.5}", ""),
    "della": ("base", "{weight: 1.0, density: 0.5, epsilon: 0.1}", ""),
    "della_linear": ("base", "{weight: 1.0, density: 0.5, epsilon: 0.1}", ""),
    "nuslerp": ("", "{weight: 0.5}|{weight: 0.5}", ""),
    "arcee_fusion": ("orca", "|", ""),
}


def plain_cases(forty: dict[str, Path]) -> list[Case]:
    out = []
    for method, (base, per_model, tail) in PLAIN.items():
        params = per_model.split("|")
        models = [forty[m] for m in FINETUNES40[: len(params)]]
        if method == "slerp":
            models = [forty["orca"]]
        if method == "arcee_fusion":  # the examples test's refused recipe: base orca, models orca and platypus
            models = [forty["orca"], forty["platypus"]]
        lines = [f"merge_method: {method}"]
        if base:
            lines.append(f"base_model: {forty[base]}")
        lines.append("models:")
        for m, p in zip(models, params or [""] * len(models)):
            lines.append(f"  - model: {m}" + (f"\n    parameters: {p}" if p else ""))
        text = "\n".join(lines) + "\n" + tail + "dtype: float32\n"
        random = method in RANDOM_METHODS
        eps = 0.1 if method.startswith("della") else None
        out.append(Case(f"plain/{method}", text, method, drop_from="orca" if random else None, density=0.5 if random else None, epsilon=eps))
    out.append(Case("plain/passthrough", f"""merge_method: passthrough
slices:
  - sources:
      - {{model: {forty['base']}, layer_range: [0, 8]}}
  - sources:
      - {{model: {forty['wizardmath']}, layer_range: [30, 40]}}
  - sources:
      - {{model: {forty['orca']}, layer_range: [4, 6]}}
dtype: float32
""", "passthrough"))
    return out


def _method_of(text: str) -> str:
    import yaml

    return yaml.safe_load(text)["merge_method"]


# -- running both tools -----------------------------------------------------------------------------
def _run(cmd: list[str], env: dict[str, str], timeout: float) -> Outcome:
    import time

    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome(False, f"timed out after {timeout:.0f} s", time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()]
        return Outcome(False, lines[-1].strip() if lines else f"exit {proc.returncode}", seconds)
    return Outcome(True, "", seconds)


class Runner:
    def __init__(self, work: Path, mergekit_yaml: Path, timeout: float, seed: int | None = None):
        self.work, self.timeout, self.seed = work, timeout, seed
        self.mergekit_yaml = mergekit_yaml
        self.mergekit_multi = mergekit_yaml.with_name("mergekit-multi")
        self.mk_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.fm_env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def folder(self, case: Case) -> Path:
        return self.work / case.name.replace("/", "__").replace("[", "-").replace("]", "")

    def run(self, case: Case) -> tuple[Outcome, Outcome]:
        d = self.folder(case)
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        cfg = d / "config.yml"
        cfg.write_text(case.text)
        if case.multi:
            mk_cmd = [str(self.mergekit_multi), str(cfg), "-I", str(d / "mk-intermediates"), "--out-path", str(d / "mk")]
        else:
            mk_cmd = [str(self.mergekit_yaml), str(cfg), str(d / "mk"), "--lora-merge-cache", str(d / "mk-lora-cache")]
        fm_cmd = [sys.executable, "-m", "fedmerge", "merge", str(cfg), str(d / "fm"), "-q"]
        if self.seed is not None:  # the random methods' masks
            mk_cmd += ["--random-seed", str(self.seed)]
            fm_cmd += ["--seed", str(self.seed)]
        mk = _run(mk_cmd, self.mk_env, self.timeout)
        fm = _run(fm_cmd, self.fm_env, self.timeout)
        for o in (mk, fm):  # messages name the config by its role, not its cache path
            o.message = o.message.replace("fedmerge merge: error: ", "").replace(str(cfg), "config.yml")
        return mk, fm

    def pairs(self, case: Case) -> list[tuple[str, Path, Path]]:
        """(label, mergekit's output, fedmerge's) for every model the case writes."""
        d = self.folder(case)
        out = [("", d / "mk", d / "fm")]
        if case.multi:
            for name in sorted(p.name for p in (d / "fm-intermediates").iterdir()):
                out.append((name, d / "mk-intermediates" / name, d / "fm-intermediates" / name))
        return out


# -- comparing outputs ------------------------------------------------------------------------------
def _tensors(folder: Path) -> dict:
    from fedmerge.checkpoints import CheckpointReader

    with CheckpointReader(folder) as r:
        return {n: r.get(n).float() for n in r.names()}


def _config(folder: Path) -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    return {**{k: cfg.get(k) for k in CONFIG_KEYS}, "dtype": cfg.get("torch_dtype") or cfg.get("dtype")}


def _tokenizer(folder: Path) -> dict | None:
    if not (folder / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    _quiet_libraries()
    tok = AutoTokenizer.from_pretrained(folder)
    return {"vocab": tok.get_vocab(), "chat_template": tok.chat_template}


def compare_exact(mk: Path, fm: Path, atol: float) -> dict:
    a, b = _tensors(mk), _tensors(fm)
    out: dict = {"tensors": [len(a), len(b)]}
    if set(a) != set(b):
        out["only_mergekit"] = sorted(set(a) - set(b))[:5]
        out["only_fedmerge"] = sorted(set(b) - set(a))[:5]
    shape = [n for n in set(a) & set(b) if a[n].shape != b[n].shape]
    if shape:
        out["shape_mismatch"] = {n: [list(a[n].shape), list(b[n].shape)] for n in sorted(shape)[:5]}
    diffs = {n: (a[n] - b[n]).abs().max().item() for n in set(a) & set(b) if a[n].shape == b[n].shape and a[n].numel()}
    worst = max(diffs, key=diffs.get) if diffs else None
    out["max_abs_diff"] = diffs[worst] if worst else 0.0
    out["worst_tensor"] = worst
    out["over_atol"] = sum(1 for v in diffs.values() if v > atol)
    out.update(_sidecars(mk, fm))
    out["ok"] = not (set(a) ^ set(b)) and not shape and out["over_atol"] == 0 and out["config_ok"] and out.get("tokenizer_ok", True)
    return out


def _sidecars(mk: Path, fm: Path) -> dict:
    out: dict = {}
    ca, cb = _config(mk), _config(fm)
    out["config_ok"] = ca == cb
    if ca != cb:
        out["config_diff"] = {k: [ca[k], cb[k]] for k in ca if ca[k] != cb[k]}
    ta, tb = _tokenizer(mk), _tokenizer(fm)
    if ta is not None and tb is not None:
        out["tokenizer_ok"] = ta == tb
        if ta["vocab"] != tb["vocab"]:
            out["tokenizer_diff"] = {"vocab_sizes": [len(ta["vocab"]), len(tb["vocab"])], "ids_differ": sorted(set(ta["vocab"].items()) ^ set(tb["vocab"].items()))[:6]}
        if ta["chat_template"] != tb["chat_template"]:
            out["chat_template_diff"] = [ta["chat_template"], tb["chat_template"]]
    elif (ta is None) != (tb is None):
        out["tokenizer_ok"] = False
        out["tokenizer_diff"] = f"tokenizer written by {'fedmerge' if ta is None else 'mergekit'} only"
    return out


def keep_probability(d, density: float, epsilon: float | None):
    """Each entry's chance to survive: ``density`` (DARE); for DELLA's MAGPRUNE it grows with the
    entry's |delta| rank r in its row (a 1-D tensor is one row) of L entries,
    ``density - epsilon + 2 epsilon r / (L - 1)``."""
    import torch

    if not epsilon:
        return torch.full_like(d, density)
    rows = d.reshape(1, -1) if d.dim() < 2 else d.reshape(d.shape[0], -1)
    length = rows.shape[1]
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).float()
    frac = ranks / (length - 1) if length > 1 else torch.full_like(ranks, 0.5)
    return (density - epsilon + 2 * epsilon * frac).reshape(d.shape)


def drop_statistics(out_dir: Path, base: dict, model: dict, density: float, epsilon: float | None) -> dict:
    """How much of ``model - base`` survives in ``out_dir``: entries left at the base (dropped)
    against the count the keep probabilities predict, as binomial z-scores over all entries, over
    the smaller and the larger half of |delta| (DELLA keeps the larger more often) and the worst
    tensor's; and the L1 norm kept (output / input, per tensor that kept anything)."""
    got = _tensors(out_dir)
    sums = {k: [0.0, 0.0, 0.0] for k in ("all", "small", "large")}  # dropped, expected, variance
    all_dropped, worst_z, worst_name, l1_ratios = 0, 0.0, None, []
    for n, b in base.items():
        d = model[n] - b
        changed = d != 0
        count = int(changed.sum())
        if count == 0:
            continue
        p = keep_probability(d, density, epsilon)
        dropped = ((got[n] - b) == 0) & changed
        large = p > density if epsilon else keep_probability(d, density, 0.5) > density  # the upper half of ranks
        for key, sel in (("all", changed), ("small", changed & ~large), ("large", changed & large)):
            sums[key][0] += float(dropped[sel].sum())
            sums[key][1] += float((1 - p[sel]).sum())
            sums[key][2] += float((p[sel] * (1 - p[sel])).sum())
        z = (float(dropped.sum()) - float((1 - p[changed]).sum())) / max(float((p[changed] * (1 - p[changed])).sum()), 1e-12) ** 0.5
        if abs(z) > abs(worst_z):
            worst_z, worst_name = z, n
        if int(dropped.sum()) == count:  # nothing left to rescale (a 16-entry norm at density 0.3: 0.7^16, it happens)
            all_dropped += 1
        else:
            l1_ratios.append(((got[n] - b).abs().sum() / d.abs().sum()).item())
    total = int(sum(int((model[n] - b != 0).sum()) for n, b in base.items()))
    out = {"drop_rate": sums["all"][0] / total, "expected_drop_rate": sums["all"][1] / total}
    for key, (x, e, v) in sums.items():
        out["z" if key == "all" else f"z_{key}_half"] = (x - e) / v**0.5
    out.update({"worst_tensor_z": worst_z, "worst_tensor": worst_name, "l1_kept": [min(l1_ratios), max(l1_ratios)], "tensors_all_dropped": all_dropped})
    return out


def compare_random(case: Case, mk: Path, fm: Path, paths: dict[str, Path]) -> dict:
    base, model = _tensors(paths["base"]), _tensors(paths[case.drop_from])
    a, b = _tensors(mk), _tensors(fm)
    out: dict = {"tensors": [len(a), len(b)]}
    out["mergekit"] = drop_statistics(mk, base, model, case.density, case.epsilon)
    out["fedmerge"] = drop_statistics(fm, base, model, case.density, case.epsilon)
    out.update(_sidecars(mk, fm))
    stats_ok = all(max(abs(s["z"]), abs(s["z_small_half"]), abs(s["z_large_half"])) < 4 and abs(s["worst_tensor_z"]) < 5 for s in (out["mergekit"], out["fedmerge"]))
    # both tools rescale the same way: the kept L1 norm agrees (both restore it, or neither)
    lm, lf = out["mergekit"]["l1_kept"], out["fedmerge"]["l1_kept"]
    out["rescale_ok"] = all(abs(x - y) < 0.05 for x, y in zip(lm, lf))
    out["ok"] = set(a) == set(b) and stats_ok and out["rescale_ok"] and out["config_ok"] and out.get("tokenizer_ok", True)
    return out


# -- the report --------------------------------------------------------------------------------------
def verdict(row: Row) -> str:
    mk, fm = row.mergekit, row.fedmerge
    if not mk.ok and not fm.ok:
        return f"both fail; mergekit: {mk.message[:90]} / fedmerge: {fm.message[:90]}"
    if not fm.ok:
        return f"mergekit runs; fedmerge refuses: {fm.message.split('; use one of')[0][:160]}"
    if not mk.ok:
        return f"mergekit fails: {mk.message[:160]}"
    parts = []
    for label, c in row.checks.items():
        what = f"{label}: " if label else ""
        if "drop_rate" not in c.get("mergekit", {}):
            bad = []
            if c.get("only_mergekit") or c.get("only_fedmerge"):
                bad.append("tensor names differ")
            if c.get("shape_mismatch"):
                bad.append("shapes differ")
            if c["over_atol"]:
                bad.append(f"{c['over_atol']} tensors over atol (worst {c['worst_tensor']})")
            if not c["config_ok"]:
                bad.append(f"config {c['config_diff']}")
            if not c.get("tokenizer_ok", True):
                bad.append("tokenizer differs")
            parts.append(what + ("pass" if not bad else "DIFF: " + "; ".join(bad)))
        else:
            m, f = c["mergekit"], c["fedmerge"]
            text = (
                f"drop rate mk {m['drop_rate']:.4f} / fm {f['drop_rate']:.4f}, expected {m['expected_drop_rate']:.4f}; "
                f"z (all, small, large-magnitude half) mk {m['z']:+.1f} {m['z_small_half']:+.1f} {m['z_large_half']:+.1f} / "
                f"fm {f['z']:+.1f} {f['z_small_half']:+.1f} {f['z_large_half']:+.1f}; "
                f"kept L1 mk {m['l1_kept'][0]:.3f}..{m['l1_kept'][1]:.3f} / fm {f['l1_kept'][0]:.3f}..{f['l1_kept'][1]:.3f}"
            )
            gone = [f"{tool} {st['tensors_all_dropped']}" for tool, st in (("mk", m), ("fm", f)) if st["tensors_all_dropped"]]
            if gone:
                text += f"; tensors dropped whole: {', '.join(gone)}"
            parts.append(what + ("pass (random): " if c["ok"] else "DIFF (random): ") + text)
    return "; ".join(parts)


def diff_cell(row: Row) -> str:
    if not (row.mergekit.ok and row.fedmerge.ok):
        return "-"
    cells = []
    for c in row.checks.values():
        cells.append("random" if "drop_rate" in c.get("mergekit", {}) else f"{c['max_abs_diff']:.2g}")
    return ", ".join(cells)


def tensors_cell(row: Row) -> str:
    if row.mergekit.ok and not row.fedmerge.ok:
        return f"{row.mergekit_tensors} / -"
    if not (row.mergekit.ok and row.fedmerge.ok):
        return "-"
    return ", ".join(f"{t[0]}" if t[0] == t[1] else f"{t[0]}/{t[1]}" for t in (c["tensors"] for c in row.checks.values()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated case names or name prefixes (examples/, features/, plain/ties)")
    ap.add_argument("--atol", type=float, default=1e-5)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per tool run")
    ap.add_argument("--json", default=None, help="write the results here (default: benchmarks/results/mergekit_parity.json)")
    ap.add_argument("--seed", type=int, default=None, help="seed both tools' random masks (default: each tool's own)")
    ap.add_argument("--list", action="store_true", help="print the case names and stop")
    args = ap.parse_args(argv)

    root = venv_dir().parent / "parity"  # the same ${FEDMERGE_CACHE:-~/.cache/fedmerge} as the mergekit environment
    zoo = Zoo(root)
    paths = zoo.paths()
    cases = example_cases(paths["forty"]) + feature_cases(paths["six"]) + plain_cases(paths["forty"])
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        cases = [c for c in cases if any(c.name == w or c.name.startswith(w) or c.name.split("/", 1)[1] == w for w in wanted)]
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    if not cases:
        raise SystemExit(f"--only {args.only!r} matches no case; --list shows them")
    mergekit_yaml = ensure_mergekit()
    zoo.ensure()
    runner = Runner(root / "work", mergekit_yaml, args.timeout, args.seed)

    rows = []
    for case in cases:
        mk, fm = runner.run(case)
        row = Row(case, mk, fm)
        if mk.ok:
            row.mergekit_tensors = len(_tensors(runner.folder(case) / "mk"))
        if mk.ok and fm.ok:
            zoo_paths = paths["forty"] if case.name.startswith(("examples/", "plain/")) else paths["six"]
            for label, a, b in runner.pairs(case):
                row.checks[label] = compare_random(case, a, b, zoo_paths) if case.drop_from and not label else compare_exact(a, b, args.atol)
        row.verdict = verdict(row)
        rows.append(row)
        print(f"{case.name:48s} mk {mk.seconds:5.1f}s fm {fm.seconds:5.1f}s  {row.verdict}", flush=True)

    print("\n| config | method | tensors | max abs diff | verdict |\n| --- | --- | ---: | ---: | --- |")
    for row in rows:
        print(f"| {row.case.name} | {row.case.method} | {tensors_cell(row)} | {diff_cell(row)} | {row.verdict} |")
    results = {
        "date": datetime.date.today().isoformat(),
        "mergekit": MERGEKIT,
        "atol": args.atol,
        "seed": args.seed,
        "zoo": str(zoo.dir),
        "machine": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()},
        "cases": [
            {
                "name": r.case.name, "method": r.case.method, "config": r.case.text,
                "mergekit": vars(r.mergekit), "fedmerge": vars(r.fedmerge), "checks": r.checks, "verdict": r.verdict,
            }
            for r in rows
        ],
    }
    from benchmarks.common import write_results

    write_results(results, args.json, "mergekit_parity")
    return 0


if __name__ == "__main__":
    sys.exit(main())
