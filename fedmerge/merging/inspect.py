"""Will these models merge well? Compatibility and per-layer mergeability figures, before merging.

``inspect_models(base, models)`` streams every tensor once (in row chunks, so memory stays
small) and reports:

- **compatibility** per input: architecture (config keys that must agree), tensor names,
  shapes, dtypes and tokenizer, each with the first offending tensor or key;
- **per layer** (``model.layers.N`` and the embedding / final norm / head): each input's
  task-vector norm, the pairwise cosine similarity of the task vectors, and the sign-conflict
  rate — among elements that at least two inputs change, the share where some push up and
  others down (what TIES' sign election has to resolve);
- **finiteness**: NaN and infinite values per input (and in the base), counted as the
  tensors stream; an input holding any is not mergeable (``merge`` refuses it), so the report
  marks it incompatible and the command exits non-zero;
- **head alignment**: for each attention block, how far the head permutation that best aligns
  each input's heads to the first input's is from the identity (share of heads moved), using
  the same alignment as the hierarchical merge. Near 0 means heads already correspond.

Low cosine with high sign conflict predicts interference; large head movement predicts that a
plain average will blur attention heads that hierarchical alignment would keep apart.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fedmerge.checkpoints import FLOAT_DTYPES, CheckpointError, CheckpointReader
from fedmerge.checkpoints.compat import CompatibilityCheck
from fedmerge.checkpoints.finite import all_finite
from fedmerge.merging.taskvector import TaskVector, open_delta_source

log = logging.getLogger(__name__)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(name: str) -> str:
    """The report row a tensor belongs to: ``layer N``, ``embed``, ``head``, ``norm`` or ``other``."""
    m = _LAYER.search(name)
    if m:
        return f"layer {int(m.group(1))}"
    if "embed" in name:
        return "embed"
    if "lm_head" in name or name.endswith("head.weight"):
        return "head"
    if "norm" in name:
        return "norm"
    return "other"


def _row_key(row: str) -> tuple[int, int]:
    order = {"embed": (0, 0), "norm": (2, 0), "head": (3, 0), "other": (4, 0)}
    if row.startswith("layer "):
        return (1, int(row.split()[1]))
    return order.get(row, (5, 0))


@dataclass
class _Acc:
    numel: int = 0
    sq: list[float] = field(default_factory=list)
    dots: dict[tuple[int, int], float] = field(default_factory=dict)
    multi: int = 0  # elements changed by at least two inputs
    conflict: int = 0  # of those, elements with both signs


def check_inputs(base: CheckpointReader, sources: Sequence[Any]) -> list[dict[str, Any]]:
    """One compatibility record per input (no exception: the report shows every problem)."""
    check = CompatibilityCheck(base, config=base.config, folder=base.folder)
    out = []
    for src in sources:
        full_model = isinstance(src, TaskVector)
        rec: dict[str, Any] = {"label": src.label, "kind": getattr(src, "kind", "?"), "path": str(getattr(src, "folder", "")), "problems": []}
        found = check.compare(src, complete=full_model, config=getattr(src, "config", None) or {}, tokenizer_folder=src.folder if full_model else None)
        rec["architecture"] = "unknown" if not found.config_known else ("different" if found.architecture else "same")
        for k, theirs, base_value in found.architecture:
            rec["problems"].append(f"config {k}={theirs!r}, base has {base_value!r}")
        if found.extra or found.missing:
            rec["names"] = "different"
        else:  # adapters and delta folders name only the tensors they change
            rec["names"] = "same" if full_model or found.input_tensors == found.base_tensors else f"subset ({found.input_tensors} of {found.base_tensors})"
        if found.missing:
            rec["problems"].append(f"{len(found.missing)} tensor(s) missing, e.g. {found.missing[0]!r}")
        if found.extra:
            rec["problems"].append(f"{len(found.extra)} tensor(s) not in the base, e.g. {found.extra[0]!r}")
        rec["shapes"] = "different" if found.shapes else "same"
        if found.shapes:
            n, theirs, base_shape = found.shapes[0]
            rec["problems"].append(f"{len(found.shapes)} shape mismatch(es), e.g. {n!r} {list(theirs)} vs {list(base_shape)}")
        rec["dtypes"] = sorted({src.info(n).dtype for n in src.names()}) if full_model else []
        rec["tokenizer"] = found.tokenizer
        if found.tokenizer == "different":
            rec["problems"].append("tokenizer.json differs from the base's")
        rec["compatible"] = not rec["problems"]
        out.append(rec)
    return out


def inspect_models(
    base_dir: str | Path,
    model_dirs: Sequence[str | Path],
    progress: bool = True,
    chunk_elements: int = 1 << 22,
    alignment: bool = True,
) -> dict[str, Any]:
    """The inspect report as a JSON-ready dict (see the module docstring)."""
    import torch

    base = CheckpointReader(base_dir)
    sources = [open_delta_source(p, base) for p in model_dirs]
    n = len(sources)
    compat = check_inputs(base, sources)
    report: dict[str, Any] = {
        "base": str(base.folder),
        "inputs": compat,
        "compatible": all(r["compatible"] for r in compat),
        "layers": [],
        "alignment": None,
    }
    if not report["compatible"]:
        return report
    names = [nm for nm in base.names() if base.info(nm).dtype in FLOAT_DTYPES]
    accs: dict[str, _Acc] = {}
    bad = _NonFinite(n)
    src_names = [set(s.names()) for s in sources]
    it: Any = names
    if progress:
        from tqdm import tqdm

        it = tqdm(names, desc="inspect", unit="tensor")
    with torch.no_grad():
        for nm in it:
            info = base.info(nm)
            acc = accs.setdefault(layer_of(nm), _Acc(sq=[0.0] * n))
            rows_total = info.shape[0] if info.shape else 1
            step = max(1, chunk_elements // max(1, info.numel // max(1, rows_total))) if info.shape else 1
            for a in range(0, rows_total, step):
                rows = (a, min(rows_total, a + step)) if info.shape else None
                b32 = base.get(nm, rows=rows).float()
                base_bad = bad.count(None, nm, b32)
                ds = []
                for i, (s, sn) in enumerate(zip(sources, src_names)):
                    d = s.get_delta(nm, rows=rows, base=b32) if nm in sn else None
                    ds.append(torch.zeros_like(b32).reshape(-1) if d is None else d.reshape(-1))
                    if d is not None:
                        # Where the base is non-finite every delta is too; those are the base's, counted once.
                        bad.count(i, nm, d if base_bad is None else d.masked_fill(base_bad, 0.0))
                acc.numel += b32.numel()
                for i in range(n):
                    acc.sq[i] += float(torch.dot(ds[i], ds[i]))
                    for j in range(i + 1, n):
                        acc.dots[(i, j)] = acc.dots.get((i, j), 0.0) + float(torch.dot(ds[i], ds[j]))
                signs = torch.stack([d.sign() for d in ds])
                nonzero = (signs != 0).sum(0) >= 2
                both = (signs > 0).any(0) & (signs < 0).any(0)
                acc.multi += int(nonzero.sum())
                acc.conflict += int((both & nonzero).sum())
    bad.report(report, base)
    labels = [s.label for s in sources]
    for row in sorted(accs, key=_row_key):
        acc = accs[row]
        norms = [math.sqrt(x) for x in acc.sq]
        cos = {}
        for (i, j), dot in acc.dots.items():
            denom = norms[i] * norms[j]
            cos[f"{labels[i]}~{labels[j]}"] = dot / denom if denom > 0 else None
        report["layers"].append(
            {
                "layer": row,
                "params": acc.numel,
                "delta_norm": dict(zip(labels, norms)),
                "cosine": cos,
                "sign_conflict": acc.conflict / acc.multi if acc.multi else None,
            }
        )
    if alignment and n >= 2:
        report["alignment"] = _alignment_report(base, sources)
    elif alignment:
        report["alignment"] = {"available": False, "reason": "head alignment needs at least two inputs"}
    return report


class _NonFinite:
    """NaN / infinity counts per input (and the base), with the first tensor holding one."""

    def __init__(self, n: int):
        self.counts = [0] * n
        self.first: list[str | None] = [None] * n
        self.base = 0
        self.base_first: str | None = None

    def count(self, index: int | None, name: str, t):
        """Count the non-finite values of ``t``; returns their mask (None when there are none)."""
        import torch

        if all_finite(t):
            return None
        mask = ~torch.isfinite(t)
        k = int(mask.sum())
        if k == 0:
            return None
        if index is None:
            self.base += k
            self.base_first = self.base_first or name
        else:
            self.counts[index] += k
            self.first[index] = self.first[index] or name
        return mask

    def report(self, report: dict[str, Any], base: CheckpointReader) -> None:
        report["base_non_finite"] = self.base
        if self.base:
            report["compatible"] = False
            report["base_problems"] = [f"{self.base} NaN/infinite value(s), e.g. in tensor {self.base_first!r}"]
        for rec, k, first in zip(report["inputs"], self.counts, self.first):
            rec["non_finite"] = k
            if k:
                rec["problems"].append(f"{k} NaN/infinite value(s), e.g. in tensor {first!r}; merge refuses it")
                rec["compatible"] = False
                report["compatible"] = False


def _alignment_report(base: CheckpointReader, sources: Sequence[Any]) -> dict[str, Any]:
    """Per attention block: how far the function-preserving head alignment of each input to the
    first input moves from the identity (share of query heads and of KV heads moved), and the mean
    head cosine distance before and after alignment."""
    import torch

    from fedmerge.merging import align

    config = base.config
    try:
        blocks = align.attention_blocks(base.names(), config)
    except Exception as exc:  # an architecture without head geometry: the report stays useful
        return {"available": False, "reason": str(exc)}
    out: dict[str, Any] = {"available": True, "reference": sources[0].label, "blocks": []}
    src_names = [set(s.names()) for s in sources]
    with torch.no_grad():
        for block in blocks:
            weights = (block.q, block.k, block.v, block.o)
            b = {nm: base.get(nm).float() for nm in weights}

            def full(i: int) -> dict[str, Any]:
                res = {}
                for nm in weights:
                    d = sources[i].get_delta(nm, base=b[nm]) if nm in src_names[i] else None
                    res[nm] = b[nm] if d is None else d.add_(b[nm])
                return res

            ref = full(0)
            row: dict[str, Any] = {"block": block.prefix.rstrip("."), "layer": block.layer, "inputs": {}}
            for i in range(1, len(sources)):
                al = align.block_permutation(ref, full(i), block)
                row["inputs"][sources[i].label] = {
                    "heads_moved": al.heads_moved / block.n_heads,
                    "kv_heads_moved": al.kv_heads_moved / block.n_kv_heads,
                    "cost_identity": al.cost_identity,
                    "cost_aligned": al.cost_aligned,
                }
            out["blocks"].append(row)
    return out


def format_report(report: dict[str, Any]) -> str:
    """The report as a human-readable table."""
    lines = [f"base: {report['base']}"]
    for p in report.get("base_problems", []):
        lines.append(f"    - base: {p}")
    for r in report["inputs"]:
        status = "ok" if r["compatible"] else "INCOMPATIBLE"
        finite = f", non-finite {r['non_finite']}" if "non_finite" in r else ""
        lines.append(
            f"  {r['label']} [{r['kind']}] {status}: architecture {r['architecture']}, names {r['names']}, shapes {r['shapes']}, "
            f"dtypes {','.join(r['dtypes']) or '-'}, tokenizer {r['tokenizer']}{finite}"
        )
        for p in r["problems"]:
            lines.append(f"    - {p}")
    if not report["compatible"]:
        lines.append("not mergeable: fix the problems above")
        if not report["layers"]:
            return "\n".join(lines)
    labels = [r["label"] for r in report["inputs"]]
    pairs = list(report["layers"][0]["cosine"]) if report["layers"] else []
    head = f"{'layer':10s} {'params':>11s} " + " ".join(f"{'|d ' + l + '|':>14s}" for l in labels) + " " + " ".join(f"{'cos ' + p:>16s}" for p in pairs) + f" {'sign-conflict':>13s}"
    lines += ["", head, "-" * len(head)]
    for row in report["layers"]:
        norms = " ".join(f"{row['delta_norm'][l]:14.4g}" for l in labels)
        cos = " ".join(f"{_fmt(row['cosine'][p]):>16s}" for p in pairs)
        lines.append(f"{row['layer']:10s} {row['params']:11d} {norms} {cos} {_fmt(row['sign_conflict']):>13s}")
    al = report.get("alignment")
    if al:
        lines.append("")
        if not al.get("available", True):
            lines.append(f"head alignment: unavailable ({al.get('reason')})")
        else:
            lines.append(f"head alignment to {al['reference']}: share of query / KV heads moved, mean head cosine distance before -> after")
            for b in al["blocks"]:
                cells = [f"{k}: {v['heads_moved']:.2f} / {v['kv_heads_moved']:.2f}, {v['cost_identity']:.3f} -> {v['cost_aligned']:.3f}" for k, v in b["inputs"].items()]
                lines.append(f"  {b['block']:28s} " + "; ".join(cells))
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False, default=str)


__all__ = ["inspect_models", "format_report", "report_json", "check_inputs", "layer_of", "CheckpointError"]
