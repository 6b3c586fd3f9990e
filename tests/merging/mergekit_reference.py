"""What mergekit computes, written out by hand for the tests (whole tensors, plain torch).

Independent of fedmerge's code on purpose: the tests compare ``fedmerge merge`` on a
mergekit-format YAML with these formulas, so a mistake would have to be made twice, the same way,
to go unnoticed. Each function states the rule it follows.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def t_of(name: str, n_layers: int) -> float:
    """Position in the stack: layer j of n has j / (n - 1); tensors outside the stack have 0."""
    j = layer_of(name)
    if j is None:
        return 0.0
    return j / (n_layers - 1) if n_layers > 1 else 1.0


def value(setting, name: str, t: float):
    """A scalar; a list of numbers interpolated at t; or the first {filter, value} whose filter is in
    the name (or has none). None when no entry matches."""
    if isinstance(setting, (int, float)):
        return setting
    if isinstance(setting, list) and all(isinstance(e, dict) for e in setting):
        for e in setting:
            f = e.get("filter")
            if f is None or f in name:
                return value(e["value"], name, t)
        return None
    pos = t * (len(setting) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(setting) - 1)
    return setting[lo] + (pos - lo) * (setting[hi] - setting[lo])


def topk_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """1 at the int(density * n) largest |delta|, 0 elsewhere (density >= 1: all ones)."""
    if density >= 1:
        return torch.ones_like(delta)
    k = int(density * delta.numel())
    mask = torch.zeros(delta.numel())
    mask[torch.topk(delta.abs().reshape(-1), k).indices] = 1
    return mask.reshape(delta.shape)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the int(gamma n) largest |delta| and enough of the smallest to keep
    int(density n); fewer large ones when the two overlap."""
    if density >= 1:
        return torch.ones_like(delta)
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    order = torch.argsort(delta.abs().reshape(-1))
    mask = torch.zeros(n)
    mask[order[bottom : n - top]] = 1
    return mask.reshape(delta.shape)


def ties(base: torch.Tensor, models: list[tuple[torch.Tensor, float, float]], normalize: bool, lam: float = 1.0, mask=None) -> torch.Tensor:
    """models: (weights, weight, density). Trim each delta to its top density (or ``mask(delta,
    density)``), weight it, elect the sign of the weighted sum (0 counts as +), keep agreeing
    entries, divide by the agreeing weights."""
    mask = mask or topk_mask
    tvs = torch.stack([w * mask(m - base, d) * (m - base) for m, w, d in models])
    weights = torch.tensor([w for _, w, _ in models]).reshape(-1, *([1] * base.dim()))
    elected = torch.where(tvs.sum(0) >= 0, 1.0, -1.0)
    agree = (tvs.sign() == elected).float()
    mixed = (tvs * agree).sum(0)
    if normalize:
        div = (weights * agree).sum(0)
        div[div == 0] = 1
        mixed = mixed / div
    return base + lam * mixed


def task_arithmetic(base: torch.Tensor, models: list[tuple[torch.Tensor, float]], lam: float = 1.0) -> torch.Tensor:
    return base + lam * sum(w * (m - base) for m, w in models)


def linear(models: list[tuple[torch.Tensor, float]], normalize: bool = True) -> torch.Tensor:
    out = sum(w * m for m, w in models)
    return out / sum(w for _, w in models) if normalize else out


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, threshold: float = 0.9995) -> torch.Tensor:
    """From a (t=0) to b (t=1) along the arc between their directions; nearly colinear: lerp."""
    va, vb = a.double().numpy().reshape(-1), b.double().numpy().reshape(-1)
    ua, ub = va / np.linalg.norm(va), vb / np.linalg.norm(vb)
    dot = float(np.sum(ua * ub))
    if abs(dot) > threshold:
        out = (1 - t) * va + t * vb
    else:
        theta = math.acos(dot)
        out = math.sin((1 - t) * theta) / math.sin(theta) * va + math.sin(t * theta) / math.sin(theta) * vb
    return torch.from_numpy(out.reshape(a.shape)).float()
