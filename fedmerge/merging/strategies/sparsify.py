"""TIES, DARE, DELLA and Model Breadcrumbs as rows of one table over a generalized task-arithmetic merge.

Every method here computes, per tensor and per element,

    theta = base + lambda * combine_i( w_i * s_i * sparsify_i(delta_i) )

and differs only in three choices, which ``VARIANTS`` lists one row per method:

- *sparsification* of each task vector: ``magnitude`` (keep the top-k by |delta|, TIES),
  ``random`` (Bernoulli keep with probability p, DARE), ``outliers`` (drop the largest gamma and
  the smallest magnitudes, Breadcrumbs), ``rank_sampling`` (keep with a probability that grows
  with the magnitude rank within a row, DELLA's MAGPRUNE);
- *sign consensus*: none (plain sum), or TIES' sign election, where only the entries that agree
  with the elected sign are kept (``consensus: sum`` elects the sign of sum_i w_i delta_i,
  ``count`` the sign of sum_i sign(w_i delta_i); a tie elects +);
- *rescale* ``s_i``: ``probability`` divides each kept entry by its keep probability (the DARE and
  DELLA papers: unbiased in expectation; for the deterministic masks, by the kept fraction), ``l1``
  scales the whole sparsified vector back to the L1 norm of the original (what mergekit does).

``normalize`` divides by the summed weights of the entries that contribute (with consensus: only
the agreeing models, per element; without: sum_i w_i). Each method is defined for one model too:
the election is then the identity and the method is its sparsification (DARE's own use).

Speed: a tensor is processed in fixed-size chunks of its flattened elements, so the temporary
memory is a few chunks whatever the tensor size. The top-k threshold is found exactly without a
sort (``rank_select``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, Sequence

from pydantic import Field, ValidationInfo, create_model, field_validator

from fedmerge.merging.strategies.base import ModelParams, Strategy, StrategyError, StrategyParams, TensorContext
from fedmerge.merging.strategies.rank_select import RankBand, abs_into, chunks
from fedmerge.merging.strategies.registry import register

# Elements per working chunk: 16 MiB of float32. Large enough that per-operation overhead is
# negligible (on a busy machine each operation pays a thread fork-join), small enough that
# temporaries stay far below one large tensor. Part of the definition
# of the random masks (draws are made chunk by chunk): changing it changes DARE/DELLA outputs.
CHUNK = 1 << 22
assert CHUNK < 1 << 24  # float32 counts of 0/1 flags over one chunk are exact

Sparsification = Literal["none", "magnitude", "random", "outliers", "rank_sampling"]


# -- parameters ------------------------------------------------------------------------------------


class DensityWeight(ModelParams):
    weight: float = Field(1.0, description="scale of this model's task vector (applied before sign election)")
    density: float = Field(1.0, ge=0.0, le=1.0, description="fraction of the task vector's entries kept")


class BreadcrumbsModel(DensityWeight):
    gamma: float = Field(0.01, ge=0.0, le=1.0, description="fraction of the largest-magnitude entries removed")


class DellaModel(DensityWeight):
    epsilon: float = Field(0.15, ge=0.0, le=0.5, description="keep probabilities range over density +/- epsilon")

    @field_validator("epsilon")
    @classmethod
    def _within_unit_interval(cls, eps: float, info: ValidationInfo) -> float:
        density = info.data.get("density")
        if density is not None and density < 1.0 and (density - eps < 0.0 or density + eps > 1.0):
            raise ValueError(f"density +/- epsilon must lie in [0, 1] (density={density}, epsilon={eps})")
        return eps


class TaskArithmeticParams(StrategyParams):
    """Global parameters of every variant; a variant's row changes only their defaults."""

    lambda_: float = Field(1.0, alias="lambda", description="scale of the combined task vector")
    normalize: bool = Field(False, description="divide by the summed weights of the contributing models")
    rescale: bool = Field(False, description="undo the shrinkage of sparsification (see rescale_mode)")
    rescale_mode: Literal["probability", "l1"] = Field("probability", description="probability: divide kept entries by their keep probability; l1: restore the L1 norm")
    int8_mask: bool = Field(False, description="accepted for mergekit configs; has no effect here")

    model_config = StrategyParams.model_config | {"populate_by_name": True}


class ConsensusParams(TaskArithmeticParams):
    consensus: Literal["sum", "count"] = Field("sum", description="sign election: sign of the weighted sum, or of the count of signs")


# -- the generalized merge -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPlan:
    """How one model's task vector is sparsified and scaled for one tensor."""

    weight: float
    density: float = 1.0
    gamma: float = 0.0
    epsilon: float = 0.0


@dataclass
class _Buffers:
    """Chunk-sized scratch space shared by every model of one tensor merge."""

    f: object  # float32: |delta|, uniform draws
    i: object  # int32: histogram keys
    k: object  # float32 0/1 keep mask
    k2: object  # float32 second mask


def generalized_merge(
    ctx: TensorContext,
    base,
    deltas: Sequence,
    plans: Sequence[ModelPlan],
    *,
    sparsification: Sparsification,
    consensus: Literal["sum", "count"] | None,
    normalize: bool,
    rescale: bool,
    rescale_mode: Literal["probability", "l1"],
    lambda_: float,
    chunk: int = CHUNK,
):
    """Pure tensor math of every method in this module; ``None`` deltas count as zero.

    Returns a new tensor shaped like ``base``; inputs are not modified.
    """
    import torch

    flat_base = base.reshape(-1)
    n = flat_base.numel()
    dev = flat_base.device
    dtype = flat_base.dtype

    # DELLA ranks magnitudes within rows: chunks must hold whole rows.
    row = base.numel() // base.shape[0] if base.dim() >= 2 and base.shape[0] else max(n, 1)
    if sparsification == "rank_sampling":
        chunk = max(1, chunk // row) * row
    size = max(1, min(chunk, n))
    bufs = _Buffers(
        f=torch.empty(size, dtype=torch.float32, device=dev),
        i=torch.empty(size, dtype=torch.int32, device=dev),
        k=torch.empty(size, dtype=torch.float32, device=dev),
        k2=torch.empty(size, dtype=torch.float32, device=dev),
    )
    sparsifiers = [
        _Sparsifier(ctx, i, d.reshape(-1), p, sparsification, rescale, rescale_mode, row, bufs, size)
        for i, (d, p) in enumerate(zip(deltas, plans))
        if d is not None
    ]
    if rescale and rescale_mode == "l1":
        for sp in sparsifiers:
            sp.fit_l1()

    total_weight = sum(p.weight for p in plans)
    if abs(total_weight) < 1e-8:
        total_weight = 1.0  # as mergekit: nothing sensible to divide by

    out = torch.empty_like(flat_base)
    n_work = len(sparsifiers) if consensus else min(1, len(sparsifiers))
    work = [torch.empty(size, dtype=dtype, device=dev) for _ in range(n_work)]
    acc_buf = torch.empty(size, dtype=dtype, device=dev)
    den_buf = torch.empty(size, dtype=dtype, device=dev) if (consensus and normalize) else None
    sgn_buf = torch.empty(size, dtype=dtype, device=dev) if consensus else None
    ones = torch.ones(size, dtype=dtype, device=dev) if consensus else None

    for sp in sparsifiers:
        sp.start()
    for s, e in chunks(n, size):
        m = e - s
        acc = acc_buf[:m]
        if not sparsifiers:
            out[s:e] = flat_base[s:e]
            continue
        if consensus is None:
            t = work[0][:m]
            for j, sp in enumerate(sparsifiers):
                sp.chunk(s, e, acc if j == 0 else t)
                if j:
                    acc.add_(t)
            if normalize:
                acc.div_(total_weight)
        else:
            ts = [buf[:m] for buf in work]
            for sp, t in zip(sparsifiers, ts):
                sp.chunk(s, e, t)
            # Elected sign per element as +1/-1; a tie elects +.
            sgn = sgn_buf[:m]
            if consensus == "sum":
                torch.add(ts[0], ts[1], out=acc) if len(ts) > 1 else acc.copy_(ts[0])
                for t in ts[2:]:
                    acc.add_(t)
            else:
                torch.sign(ts[0], out=acc)
                for t in ts[1:]:
                    acc.add_(torch.sign(t, out=sgn))
            # copysign(1, acc) is +1 for acc = +0 (a tie: x + (-x) rounds to +0); acc is -0 only
            # when every contribution is a signed zero, where no model can agree anyway.
            torch.copysign(ones[:m], acc, out=sgn)
            # t * sgn > 0 exactly where a model agrees: clamping keeps |t| there and 0 elsewhere.
            den = den_buf[:m] if den_buf is not None else None
            for j, (sp, t) in enumerate(zip(sparsifiers, ts)):
                t.mul_(sgn).clamp_(min=0)
                if j == 0:
                    acc.copy_(t)
                else:
                    acc.add_(t)
                if den is not None:
                    t.sign_()
                    if j == 0:
                        torch.mul(t, sp.plan.weight, out=den)
                    else:
                        den.add_(t, alpha=sp.plan.weight)
            acc.mul_(sgn)
            if den is not None:
                zero = bufs.k[:m]
                torch.eq(den, 0, out=zero)
                den.add_(zero)  # no agreeing model: the numerator is 0, divide by 1
                acc.div_(den)
        torch.add(flat_base[s:e], acc, alpha=lambda_, out=out[s:e])
    return out.view(base.shape)


class _Sparsifier:
    """One model's sparsify-and-scale, applied chunk by chunk; replayable (``start`` rewinds)."""

    def __init__(self, ctx, index, flat, plan: ModelPlan, method, rescale, rescale_mode, row, bufs: _Buffers, size: int):
        self.ctx, self.index, self.flat, self.plan = ctx, index, flat, plan
        self.method = method if (method != "none" and plan.density < 1.0) else "none"
        self.rescale, self.mode, self.row = rescale, rescale_mode, row
        self.bufs, self.size = bufs, size
        self.dev = flat.device
        self.scale = plan.weight
        self.gen = None
        n = flat.numel()
        self.band = None
        if self.method == "magnitude":
            k = int(plan.density * n)
            self.band = RankBand(flat, n - k, n, bufs.f, bufs.i)
        elif self.method == "outliers":
            keep_n = int(plan.density * n)
            n_top = int(plan.gamma * n)
            n_bot = n - keep_n - n_top
            if n_bot < 0:  # as mergekit: remove fewer outliers to reach the density
                n_top += n_bot
                n_bot = 0
            self.band = RankBand(flat, n_bot, n - n_top, bufs.f, bufs.i)
        if rescale and rescale_mode == "probability":
            if self.band is not None and self.band.kept:
                self.scale = plan.weight * n / self.band.kept
            elif self.method == "random" and plan.density > 0:
                self.scale = plan.weight / plan.density
            # rank_sampling divides each kept entry by its own probability (see _della_chunk)

    def start(self):
        """Rewind before a pass: random masks are drawn afresh from the same per-(tensor, model)
        seed and tie counters restart, so a replayed pass sees exactly the same masks."""
        if self.method in ("random", "rank_sampling"):
            local = dataclasses.replace(self.ctx, device=str(self.dev))
            self.gen = local.generator(f"#sparsify:{self.index}")
        if self.band is not None:
            self.band.reset()

    def chunk(self, s, e, t, *, raw=False):
        """Write this model's processed delta for elements [s, e) into ``t`` (``raw``: unscaled)."""
        import torch

        d = self.flat[s:e]
        m = e - s
        scale = 1.0 if raw else self.scale
        if self.method == "none":
            torch.mul(d, scale, out=t)
            return t
        if self.method in ("magnitude", "outliers"):
            keep = self.band.mask(abs_into(d, self.bufs.f), self.bufs.k, self.bufs.k2)
        elif self.method == "random":
            u = self.bufs.f[:m]
            torch.rand(m, generator=self.gen, device=self.dev, out=u)
            keep = self.bufs.k[:m]
            torch.lt(u, self.plan.density, out=keep)
        else:
            keep = self._della_keep(d, raw)
        if scale != 1.0:
            keep.mul_(scale)
        torch.mul(d, keep, out=t)
        return t

    def _della_keep(self, d, raw):
        """MAGPRUNE keep mask for whole rows, divided by the keep probability when rescaling."""
        import torch

        m = d.numel()
        rows = max(1, m // self.row)
        length = m // rows
        order = d.abs().view(rows, length).argsort(dim=1, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(length, device=self.dev).expand(rows, length))
        p = ranks.view(-1).to(torch.float32)
        del order, ranks
        if length > 1:
            p.mul_(2.0 * self.plan.epsilon / (length - 1)).add_(self.plan.density - self.plan.epsilon)
        else:
            p.fill_(self.plan.density)
        u = self.bufs.f[:m]
        torch.rand(m, generator=self.gen, device=self.dev, out=u)
        keep = self.bufs.k[:m]
        torch.lt(u, p, out=keep)
        if self.rescale and self.mode == "probability" and not raw:
            keep.div_(p.clamp_(min=1e-12))  # a kept entry has p > 0; the others stay 0
        return keep

    def fit_l1(self):
        """mergekit's rescale: scale the sparsified vector back to the original L1 norm."""
        import torch

        if self.method == "none":
            return
        before = after = 0.0
        self.start()
        tmp = torch.empty(self.size, dtype=self.flat.dtype, device=self.dev)
        for s, e in chunks(self.flat.numel(), self.size):
            before += float(self.flat[s:e].abs().sum(dtype=torch.float64))
            t = self.chunk(s, e, tmp[: e - s], raw=True)
            after += float(t.abs().sum(dtype=torch.float64))
        if before >= 1e-7 and after >= 1e-7:
            self.scale = self.plan.weight * before / after


# -- the methods: one row each ---------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One generalized task-arithmetic method: its name, paper, the three choices and its defaults."""

    name: str
    paper: str
    sparsification: Sparsification
    consensus: bool  # TIES' sign election (the ``consensus`` parameter chooses sum or count)
    per_model: type[ModelParams]
    defaults: Mapping[str, Any]  # global parameters whose default differs from TaskArithmeticParams'
    doc: str  # first line: summary; then the formula


TIES_PAPER = "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023 (arXiv:2306.01708)"
DARE_PAPER = "Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch, ICML 2024 (arXiv:2311.03099)"
DELLA_PAPER = "Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling (arXiv:2406.11617)"
BREADCRUMBS_PAPER = "Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, ECCV 2024 (arXiv:2312.06795)"

VARIANTS: tuple[Variant, ...] = (
    Variant("ties", TIES_PAPER, "magnitude", True, DensityWeight, {"normalize": True}, """\
TIES-merging: trim to the top-density magnitudes, elect a sign per entry, disjoint mean.

tau_i = w_i * topk_{density_i}(|delta_i|) (entries outside the top-k are 0)
s     = sign(sum_i tau_i)            (consensus: sum)   |  sign(sum_i sign(tau_i))  (count)
theta = base + lambda * sum_i tau_i [sign(tau_i) = s] / sum_i w_i [sign(tau_i) = s]
(the division only with normalize, the default; where no model agrees the entry is base).
Weights are applied before the election, as in mergekit; with equal weights this is the
paper's elect + disjoint merge. Defaults: density 1, normalize true, rescale false, lambda 1.
"""),
    Variant("dare_ties", DARE_PAPER, "random", True, DensityWeight, {"rescale": True}, """\
DARE + TIES: drop each delta entry with probability 1 - density, rescale, then TIES' sign election.

m_i ~ Bernoulli(density_i) per entry (seeded per tensor and model)
tau_i = w_i * m_i * delta_i / density_i     (rescale true, rescale_mode probability: the paper)
theta = base + lambda * sum_i tau_i [sign(tau_i) = s]  (/ sum_i w_i [sign(tau_i) = s] if normalize)
Defaults as mergekit: rescale true, normalize false, lambda 1, consensus sum.
"""),
    Variant("dare_linear", DARE_PAPER, "random", False, DensityWeight, {"rescale": True}, """\
DARE: drop each delta entry with probability 1 - density, rescale, add (task arithmetic).

tau_i = w_i * m_i * delta_i / density_i,  m_i ~ Bernoulli(density_i)
theta = base + lambda * sum_i tau_i     (/ sum_i w_i if normalize)
Defaults as mergekit: rescale true, normalize false, lambda 1.
"""),
    Variant("della", DELLA_PAPER, "rank_sampling", True, DellaModel, {"normalize": True, "rescale": True}, """\
DELLA: magnitude-ranked random drop (MAGPRUNE), rescale by 1/p, TIES' sign election, scale lambda.

Within each row (a 1-D tensor is one row) entry j of rank r_j (ascending |delta|, 0..L-1) is kept
with probability p_j = density - epsilon + 2 epsilon r_j / (L - 1), mean density;
tau_i = w_i * m_i * delta_i / p     (rescale probability)
theta = base + lambda * sum_i tau_i [sign(tau_i) = s] / sum_i w_i [sign(tau_i) = s]
Defaults as mergekit: epsilon 0.15, normalize true, rescale true, lambda 1.
"""),
    Variant("della_linear", DELLA_PAPER, "rank_sampling", False, DellaModel, {"rescale": True}, """\
DELLA without sign election: MAGPRUNE each task vector, rescale, add.

theta = base + lambda * sum_i w_i m_i delta_i / p   (/ sum_i w_i if normalize)
Defaults as mergekit: epsilon 0.15, normalize false, rescale true, lambda 1.
"""),
    Variant("breadcrumbs", BREADCRUMBS_PAPER, "outliers", False, BreadcrumbsModel, {}, """\
Model Breadcrumbs: drop the largest gamma and the smallest entries of each task vector, add.

With n entries: the int(gamma n) largest |delta| and the n - int(density n) - int(gamma n)
smallest are removed, so int(density n) remain (fewer outliers are removed if density + gamma > 1);
theta = base + lambda * sum_i w_i mask_i delta_i     (/ sum_i w_i if normalize)
Defaults as mergekit: density 1, gamma 0.01, normalize false, rescale false, lambda 1.
"""),
    Variant("breadcrumbs_ties", BREADCRUMBS_PAPER, "outliers", True, BreadcrumbsModel, {}, """\
Model Breadcrumbs masks followed by TIES' sign election.

tau_i = w_i mask_i delta_i (as breadcrumbs);
theta = base + lambda * sum_i tau_i [sign(tau_i) = s]  (/ sum_i w_i [sign(tau_i) = s] if normalize)
Defaults as mergekit: density 1, gamma 0.01, normalize false, rescale false, consensus sum.
"""),
)


class GeneralizedTaskArithmetic(Strategy):
    """Shared body of every row of ``VARIANTS``: a method is its ``variant``."""

    variant: ClassVar[Variant]
    min_models = 1

    def __init__(self, params, model_params):
        super().__init__(params, model_params)
        # With nothing pruned (every density 1) no statistic over the tensor and no random draw
        # is involved: the engine may then stream large tensors in row chunks.
        self.elementwise = all(mp.density >= 1.0 for mp in self.model_params)

    @staticmethod
    def _plan(mp) -> ModelPlan:
        return ModelPlan(
            weight=mp.weight,
            density=mp.density,
            gamma=getattr(mp, "gamma", 0.0),
            epsilon=getattr(mp, "epsilon", 0.0),
        )

    def merge_tensor(self, ctx: TensorContext, base, deltas: Sequence):
        if len(deltas) != len(ctx.model_params):
            raise StrategyError(f"{self.name}: {len(deltas)} deltas for {ctx.name} but {len(ctx.model_params)} model parameter sets")
        p = self.params
        v = self.variant
        return generalized_merge(
            ctx,
            base,
            deltas,
            [self._plan(mp) for mp in ctx.model_params],
            sparsification=v.sparsification,
            consensus=p.consensus if v.consensus else None,
            normalize=p.normalize,
            rescale=p.rescale,
            rescale_mode=p.rescale_mode,
            lambda_=p.lambda_,
        )


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _params_class(v: Variant) -> type[StrategyParams]:
    """The variant's parameter schema: the shared fields with the row's defaults."""
    base = ConsensusParams if v.consensus else TaskArithmeticParams
    overrides = {}
    for key, default in v.defaults.items():
        info = base.model_fields[key]
        overrides[key] = (info.annotation, Field(default, description=info.description))
    return create_model(f"{_class_name(v.name)}Params", __base__=base, __module__=__name__, **overrides)


def _strategy_class(v: Variant) -> type[GeneralizedTaskArithmetic]:
    cls_name = _class_name(v.name)
    namespace = {
        "__doc__": v.doc,
        "__module__": __name__,
        "__qualname__": cls_name,
        "name": v.name,
        "paper": v.paper,
        "Params": _params_class(v),
        "PerModel": v.per_model,
        "variant": v,
    }
    return register(type(cls_name, (GeneralizedTaskArithmetic,), namespace))


METHODS: dict[str, type[GeneralizedTaskArithmetic]] = {v.name: _strategy_class(v) for v in VARIANTS}
