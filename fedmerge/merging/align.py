"""Attention-head alignment between two models of one architecture (pure tensor math, no I/O).

Two models may compute the same function with their attention heads in a different order. Within
one attention block, moving a whole query head together with its o_proj input columns, and a
whole key/value head together with the query heads that read it (grouped-query attention), leaves
the block's output unchanged; RoPE acts inside each head, so it does not care. This module finds,
for a block of an *other* model, the function-preserving head permutation that best matches a
*reference* model, and applies it:

- ``kv_perm[j]``: the other model's KV head placed at slot j;
- ``q_perm[h]``: the other model's query head placed at slot h, always inside the group of
  ``kv_perm[h // g]`` (g = n_heads / n_kv_heads), so every query head keeps reading its own KV head.

The matching cost is the cosine distance 1 - cos between heads, summed over the four projections:
k and v heads (rows of k_proj/v_proj), query heads (rows of q_proj) and their o_proj columns. The
exact optimum over all function-preserving permutations is found by nesting two assignments: for
every pair of KV groups, the best matching of their query heads (Hungarian on a g x g block); then
the best matching of KV groups under those costs (Hungarian on n_kv x n_kv). Biases follow the
rows they belong to (o_proj's bias acts on the hidden size and never moves).

``per_projection_permutations`` is the literal reading of the paper's Algorithm 2: each projection
aligned on its own, which may break the function when the four disagree.

Tensor names follow the Hugging Face Llama/Mistral/Qwen layout,
``<prefix>layers.N.self_attn.{q,k,v,o}_proj.{weight,bias}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from fedmerge.merging.strategies.base import StrategyError


class AlignmentError(StrategyError):
    """Attention heads cannot be aligned: missing head geometry, or tensors of the wrong shape."""


_ATTN = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.self_attn\.)(?P<proj>[qkvo])_proj\.(?P<kind>weight|bias)$")


@dataclass(frozen=True)
class AttentionBlock:
    """The tensors of one attention block and its head geometry."""

    layer: int
    prefix: str
    q: str
    k: str
    v: str
    o: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    q_bias: str | None = None
    k_bias: str | None = None
    v_bias: str | None = None
    o_bias: str | None = None

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def names(self) -> tuple[str, ...]:
        """Every tensor of the block: the four weights, then the biases that exist."""
        return tuple(n for n in (self.q, self.k, self.v, self.o, self.q_bias, self.k_bias, self.v_bias, self.o_bias) if n)


@dataclass(frozen=True)
class BlockAlignment:
    """A function-preserving head permutation of one block, and how much it improves the match.

    Costs are mean cosine distances (1 - cos) over the 2 n_kv + 2 n_heads head comparisons
    (k, v per KV head; q and o per query head): 0 means identical heads.
    """

    kv_perm: tuple[int, ...]
    q_perm: tuple[int, ...]
    cost_identity: float = 0.0
    cost_aligned: float = 0.0

    @property
    def heads_moved(self) -> int:
        """Query heads whose position changes."""
        return sum(1 for h, src in enumerate(self.q_perm) if h != src)

    @property
    def kv_heads_moved(self) -> int:
        return sum(1 for j, src in enumerate(self.kv_perm) if j != src)

    @property
    def is_identity(self) -> bool:
        return self.heads_moved == 0 and self.kv_heads_moved == 0

    @staticmethod
    def identity(block: AttentionBlock) -> "BlockAlignment":
        return BlockAlignment(tuple(range(block.n_kv_heads)), tuple(range(block.n_heads)))


def head_geometry(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim) from an HF config dict (or its ``text_config``)."""
    cfg = config
    if "num_attention_heads" not in cfg and isinstance(cfg.get("text_config"), Mapping):
        cfg = cfg["text_config"]
    n_heads = cfg.get("num_attention_heads")
    if not n_heads:
        raise AlignmentError("config.json has no num_attention_heads: attention heads cannot be aligned (use alignment: none)")
    n_kv = cfg.get("num_key_value_heads") or n_heads
    head_dim = cfg.get("head_dim")
    if not head_dim:
        hidden = cfg.get("hidden_size")
        if not hidden:
            raise AlignmentError("config.json has neither head_dim nor hidden_size: attention heads cannot be aligned")
        head_dim = hidden // n_heads
    if n_heads % n_kv:
        raise AlignmentError(f"config.json: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
    return int(n_heads), int(n_kv), int(head_dim)


def attention_blocks(names: Sequence[str], config: Mapping[str, Any]) -> list[AttentionBlock]:
    """Every attention block whose four projection weights are all present, by layer.

    Head geometry comes from the (base) model's config. Blocks missing a projection (e.g. a fused
    qkv_proj) are not returned; their tensors are merged without alignment.
    """
    found: dict[tuple[str, int], dict[str, str]] = {}
    for name in names:
        m = _ATTN.match(name)
        if m:
            key = (m["prefix"], int(m["layer"]))
            slot = m["proj"] if m["kind"] == "weight" else m["proj"] + "_bias"
            found.setdefault(key, {})[slot] = name
    blocks = [parts for parts in found.values() if all(p in parts for p in "qkvo")]
    if not blocks:
        return []
    n_heads, n_kv, head_dim = head_geometry(config)
    out = []
    for (prefix, layer), parts in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if not all(p in parts for p in "qkvo"):
            continue
        out.append(
            AttentionBlock(
                layer=layer,
                prefix=prefix,
                q=parts["q"],
                k=parts["k"],
                v=parts["v"],
                o=parts["o"],
                n_heads=n_heads,
                n_kv_heads=n_kv,
                head_dim=head_dim,
                q_bias=parts.get("q_bias"),
                k_bias=parts.get("k_bias"),
                v_bias=parts.get("v_bias"),
                o_bias=parts.get("o_bias"),
            )
        )
    return out


# -- per-head similarity ---------------------------------------------------------------------------


def _check_shapes(tensors: Mapping[str, Any], block: AttentionBlock, who: str) -> None:
    d, h, kv = block.head_dim, block.n_heads, block.n_kv_heads
    for name in (block.q, block.k, block.v, block.o):
        if name not in tensors:
            raise AlignmentError(f"{who}: tensor {name} missing for the attention block of layer {block.layer}")
    hidden = tensors[block.q].shape[1] if tensors[block.q].dim() == 2 else None
    want = {
        block.q: (h * d, hidden),
        block.k: (kv * d, hidden),
        block.v: (kv * d, hidden),
        block.o: (hidden, h * d),
    }
    for name, shape in want.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise AlignmentError(
                f"{who}: {name} has shape {list(got)}, expected {list(shape)} for {h} heads, {kv} KV heads of dim {d}; check the config's head geometry"
            )


def _row_heads(w, n: int):
    return w.reshape(n, -1)


def _cosine_matrix(a, b):
    """cos between every row of a (n x D) and every row of b (m x D), float64 on the CPU.

    Zero rows have cosine 0 with everything (cost 1), so they never attract a match.
    """
    import torch

    g = (a @ b.T).double()
    na = torch.linalg.vector_norm(a, dim=1).double()
    nb = torch.linalg.vector_norm(b, dim=1).double()
    denom = na[:, None] * nb[None, :]
    cos = torch.where(denom > 0, g / denom.clamp(min=1e-300), torch.zeros_like(g))
    return cos.clamp(-1.0, 1.0).cpu()


def _o_cosine_matrix(o_ref, o_other, n_heads: int, head_dim: int):
    """cos between o_proj column blocks (one block of head_dim columns per query head)."""
    import torch

    hidden = o_ref.shape[0]
    a = o_ref.reshape(hidden, n_heads, head_dim)
    b = o_other.reshape(hidden, n_heads, head_dim)
    g = torch.einsum("xie,xje->ij", a, b).double()
    na = a.pow(2).sum(dim=(0, 2)).sqrt().double()
    nb = b.pow(2).sum(dim=(0, 2)).sqrt().double()
    denom = na[:, None] * nb[None, :]
    cos = torch.where(denom > 0, g / denom.clamp(min=1e-300), torch.zeros_like(g))
    return cos.clamp(-1.0, 1.0).cpu()


@dataclass(frozen=True)
class _Costs:
    q: Any  # n_heads x n_heads, 1 - cos (numpy)
    k: Any  # n_kv x n_kv
    v: Any
    o: Any  # n_heads x n_heads


def _costs(ref: Mapping[str, Any], other: Mapping[str, Any], block: AttentionBlock) -> _Costs:
    import torch

    _check_shapes(ref, block, "reference model")
    _check_shapes(other, block, "aligned model")
    h, kv, d = block.n_heads, block.n_kv_heads, block.head_dim
    with torch.no_grad():
        q = 1.0 - _cosine_matrix(_row_heads(ref[block.q].float(), h), _row_heads(other[block.q].float(), h))
        k = 1.0 - _cosine_matrix(_row_heads(ref[block.k].float(), kv), _row_heads(other[block.k].float(), kv))
        v = 1.0 - _cosine_matrix(_row_heads(ref[block.v].float(), kv), _row_heads(other[block.v].float(), kv))
        o = 1.0 - _o_cosine_matrix(ref[block.o].float(), other[block.o].float(), h, d)
    return _Costs(q.numpy(), k.numpy(), v.numpy(), o.numpy())


# -- function-preserving alignment -----------------------------------------------------------------


def block_permutation(ref_tensors: Mapping[str, Any], other_tensors: Mapping[str, Any], block: AttentionBlock) -> BlockAlignment:
    """The function-preserving head permutation of ``other`` that best matches ``ref``.

    ``ref_tensors`` / ``other_tensors``: the block's weights (full weights, not deltas) by name.
    Exact optimum of the summed cosine cost over KV-group permutations and query-head permutations
    within groups. Where the identity is as good as the optimum it is kept (no gratuitous moves).
    """
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    c = _costs(ref_tensors, other_tensors, block)
    h, kv, g = block.n_heads, block.n_kv_heads, block.group_size
    cqo = c.q + c.o
    pair_cost = c.k + c.v  # kv x kv
    inner: dict[tuple[int, int], np.ndarray] = {}
    total = np.array(pair_cost, dtype=np.float64, copy=True)
    for j in range(kv):
        for jj in range(kv):
            sub = cqo[j * g : (j + 1) * g, jj * g : (jj + 1) * g]
            if g == 1:
                inner[(j, jj)] = np.zeros(1, dtype=np.int64)
                total[j, jj] += sub[0, 0]
            else:
                rows, cols = linear_sum_assignment(sub)
                inner[(j, jj)] = cols
                total[j, jj] += sub[rows, cols].sum()
    _, kv_cols = linear_sum_assignment(total)
    n_terms = 2 * kv + 2 * h
    identity_cost = float(np.trace(pair_cost) + np.trace(cqo)) / n_terms
    aligned_cost = float(total[np.arange(kv), kv_cols].sum()) / n_terms
    if aligned_cost >= identity_cost - 1e-12:
        return BlockAlignment(tuple(range(kv)), tuple(range(h)), identity_cost, identity_cost)
    q_perm = []
    for j in range(kv):
        src = int(kv_cols[j])
        q_perm.extend(src * g + int(r) for r in inner[(j, src)])
    return BlockAlignment(tuple(int(x) for x in kv_cols), tuple(q_perm), identity_cost, aligned_cost)


def check_function_preserving(alignment: BlockAlignment, block: AttentionBlock) -> None:
    """Raise unless ``alignment`` is a valid GQA-consistent head permutation for ``block``."""
    h, kv, g = block.n_heads, block.n_kv_heads, block.group_size
    if sorted(alignment.kv_perm) != list(range(kv)):
        raise AlignmentError(f"layer {block.layer}: kv_perm {list(alignment.kv_perm)} is not a permutation of {kv} KV heads")
    if sorted(alignment.q_perm) != list(range(h)):
        raise AlignmentError(f"layer {block.layer}: q_perm {list(alignment.q_perm)} is not a permutation of {h} query heads")
    for slot, src in enumerate(alignment.q_perm):
        if src // g != alignment.kv_perm[slot // g]:
            raise AlignmentError(
                f"layer {block.layer}: query head {src} moved to slot {slot} would read KV head "
                f"{alignment.kv_perm[slot // g]} instead of {src // g}; not function-preserving"
            )


def _head_rows(perm: Sequence[int], head_dim: int, device):
    import torch

    p = torch.as_tensor(list(perm), dtype=torch.long, device=device)
    return (p[:, None] * head_dim + torch.arange(head_dim, device=device)[None, :]).reshape(-1)


def apply_block_permutation(tensors: Mapping[str, Any], block: AttentionBlock, alignment: BlockAlignment) -> dict[str, Any]:
    """A copy of ``tensors`` with the block's heads permuted (other entries passed through).

    Works on full weights and on deltas alike (a permutation is linear). Identity: no copies.
    """
    check_function_preserving(alignment, block)
    out = dict(tensors)
    if alignment.is_identity:
        return out
    dev = tensors[block.q].device
    q_rows = _head_rows(alignment.q_perm, block.head_dim, dev)
    kv_rows = _head_rows(alignment.kv_perm, block.head_dim, dev)
    for name, rows in ((block.q, q_rows), (block.q_bias, q_rows), (block.k, kv_rows), (block.k_bias, kv_rows), (block.v, kv_rows), (block.v_bias, kv_rows)):
        if name and name in tensors and tensors[name] is not None:
            out[name] = tensors[name].index_select(0, rows)
    if tensors.get(block.o) is not None:
        out[block.o] = tensors[block.o].index_select(1, q_rows)
    return out


# -- the paper's literal variant: each projection on its own -----------------------------------------


def per_projection_permutations(ref_tensors: Mapping[str, Any], other_tensors: Mapping[str, Any], block: AttentionBlock) -> dict[str, tuple[int, ...]]:
    """Algorithm 2 applied to q, k, v and o independently: {"q", "k", "v", "o"} -> head permutation.

    Each projection is cut along its own head axis (rows of q/k/v, o_proj's input columns) and
    matched by its own Hungarian assignment. Nothing ties the four together, so the result may
    not preserve the function.
    """
    from scipy.optimize import linear_sum_assignment

    c = _costs(ref_tensors, other_tensors, block)
    out = {}
    for key, cost in (("q", c.q), ("k", c.k), ("v", c.v), ("o", c.o)):
        _, cols = linear_sum_assignment(cost)
        identity = float(cost.trace())
        chosen = float(cost[range(len(cols)), cols].sum())
        out[key] = tuple(range(len(cols))) if chosen >= identity - 1e-12 else tuple(int(x) for x in cols)
    return out


def apply_per_projection(tensors: Mapping[str, Any], block: AttentionBlock, perms: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """A copy of ``tensors`` with each projection's heads permuted by its own permutation."""
    out = dict(tensors)
    dev = tensors[block.q].device
    d = block.head_dim
    for key, weight, bias, axis in (("q", block.q, block.q_bias, 0), ("k", block.k, block.k_bias, 0), ("v", block.v, block.v_bias, 0), ("o", block.o, None, 1)):
        perm = perms[key]
        if list(perm) == list(range(len(perm))):
            continue
        rows = _head_rows(perm, d, dev)
        out[weight] = tensors[weight].index_select(axis, rows)
        if bias and tensors.get(bias) is not None:
            out[bias] = tensors[bias].index_select(0, rows)
    return out
