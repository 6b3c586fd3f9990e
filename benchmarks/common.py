"""Shared benchmark inputs: a ~1B-parameter Mistral-shaped bf16 base and two "fine-tunes".

Generated once, seeded, tensor by tensor (never a whole model in memory: a few hundred MB at
most), under ``${FEDMERGE_CACHE:-~/.cache/fedmerge}/bench/``. The weights are random, not
trained: benchmarks measure speed, memory and bytes, which do not depend on what the numbers
mean. Each folder is written atomically, so a folder that exists is complete.

    from benchmarks.common import ensure_1b_set
    base_dir, (ft1_dir, ft2_dir) = ensure_1b_set()
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchModelSpec:
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 22
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    vocab_size: int = 32000
    dtype: str = "bfloat16"
    seed: int = 0
    finetunes: int = 2
    noise: float = 0.002  # std of the seeded noise that makes a "fine-tune" of the base

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab_size, h))]
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (self.num_attention_heads * self.head_dim, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, self.num_attention_heads * self.head_dim)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab_size, h))]
        return out

    def n_params(self) -> int:
        total = 0
        for _, shape in self.tensor_shapes():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


SPEC_1B = BenchModelSpec()
# Same widths, half the layers: shows that peak memory does not grow with model size.
SPEC_HALF = replace(SPEC_1B, num_hidden_layers=11)
# Same widths and vocabulary, two layers (0.2B): every tensor shape of the 1B set, for methods
# too slow on CPU to run over all 22 layers (peak memory follows the largest tensors).
SPEC_WIDTHS = replace(SPEC_1B, num_hidden_layers=2)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("FEDMERGE_CACHE") or Path.home() / ".cache" / "fedmerge") / "bench"


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _write_config(spec: BenchModelSpec, folder: Path) -> None:
    from fedmerge.toymodels import TinyMistralSpec, mistral_config, train_tokenizer

    tiny = TinyMistralSpec(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=4096,
    )
    cfg = mistral_config(tiny)
    cfg.torch_dtype = spec.dtype
    folder.mkdir(parents=True, exist_ok=True)
    cfg.to_json_file(str(folder / "config.json"))
    train_tokenizer(folder, vocab_size=512)


def _generate_base(spec: BenchModelSpec, out: Path, sidecars: Path) -> None:
    import torch
    from tqdm import tqdm

    from fedmerge.checkpoints import CheckpointWriter, safetensors_dtype

    dtype = getattr(torch, spec.dtype)
    shapes = spec.tensor_shapes()
    with CheckpointWriter(out, max_shard_bytes=2 * 1024**3) as w:
        w.plan([(n, s, safetensors_dtype(dtype)) for n, s in shapes])
        for name, shape in tqdm(shapes, desc=f"generate {out.name}", unit="tensor"):
            gen = torch.Generator().manual_seed(_seed_for(spec.seed, name))
            if len(shape) == 1:
                t = 1.0 + 0.05 * torch.randn(shape, generator=gen)
            else:
                t = torch.randn(shape, generator=gen).mul_(0.02)
            w.add(name, t.to(dtype))
            del t
        w.commit(sidecars_from=sidecars, metadata={"bench_spec": asdict(spec), "role": "base"})


def _generate_finetune(spec: BenchModelSpec, base: Path, out: Path, index: int) -> None:
    import torch
    from tqdm import tqdm

    from fedmerge.checkpoints import CheckpointReader, CheckpointWriter

    reader = CheckpointReader(base)
    with CheckpointWriter(out, max_shard_bytes=2 * 1024**3) as w:
        w.plan([reader.info(n) for n in reader.names()])
        for name in tqdm(reader.names(), desc=f"generate {out.name}", unit="tensor"):
            t = reader.get(name)
            gen = torch.Generator().manual_seed(_seed_for(spec.seed + 1000 * (index + 1), name))
            noisy = t.float().add_(torch.randn(t.shape, generator=gen), alpha=spec.noise)
            w.add(name, noisy.to(t.dtype))
            del t, noisy
        w.commit(sidecars_from=base, metadata={"bench_spec": asdict(spec), "role": f"finetune-{index + 1}"})


def ensure_bench_set(spec: BenchModelSpec, cache_dir: str | os.PathLike[str] | None = None) -> tuple[Path, list[Path]]:
    """Base + ``spec.finetunes`` fine-tunes for ``spec``, generated on first use."""
    root = cache_root(cache_dir) / f"mistral-{spec.n_params() / 1e9:.2f}b-{spec.key()}"
    base = root / "base"
    fts = [root / f"ft{i + 1}" for i in range(spec.finetunes)]
    if base.exists() and all(f.exists() for f in fts):
        return base, fts
    root.mkdir(parents=True, exist_ok=True)
    sidecars = root / ".sidecars"
    if not (sidecars / "config.json").exists():
        _write_config(spec, sidecars)
    if not base.exists():
        log.info("generating benchmark base %s (%.2fB parameters)", base, spec.n_params() / 1e9)
        _generate_base(spec, base, sidecars)
    for i, ft in enumerate(fts):
        if not ft.exists():
            _generate_finetune(spec, base, ft, i)
    return base, fts


def ensure_1b_set(cache_dir: str | os.PathLike[str] | None = None) -> tuple[Path, list[Path]]:
    """The shared ~1.1B-parameter Mistral-shaped bf16 set: (base_dir, [ft1_dir, ft2_dir])."""
    return ensure_bench_set(SPEC_1B, cache_dir)


def ensure_half_set(cache_dir: str | os.PathLike[str] | None = None) -> tuple[Path, list[Path]]:
    """Same widths as the 1B set, half the layers (~0.6B parameters)."""
    return ensure_bench_set(SPEC_HALF, cache_dir)


def ensure_widths_set(cache_dir: str | os.PathLike[str] | None = None) -> tuple[Path, list[Path]]:
    """Every tensor shape of the 1B set (vocabulary included), two layers (~0.2B parameters)."""
    return ensure_bench_set(SPEC_WIDTHS, cache_dir)


def write_results(data, json_path: str | os.PathLike[str] | None, name: str) -> Path:
    """Write a benchmark's results as JSON to ``json_path``, or to ``benchmarks/results/<name>.json``
    (ignored by git: results are quoted in the README, never committed); says where."""
    path = Path(json_path) if json_path else Path(__file__).resolve().parent / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    print(f"\nresults written to {path}")
    return path


def cached_demo_world(config, cache_dir=None):
    """The cached world of a demo config (benchmarks never build one), or None after saying how to make it."""
    import sys

    from fedmerge.demo.world import cache_root as demo_cache_root
    from fedmerge.demo.world import load_world

    root = demo_cache_root(cache_dir) / "demo" / config.world.key()
    if not root.exists():
        print(f"no cached demo world at {root}; run `fedmerge demo` first", file=sys.stderr)
        return None
    return load_world(root)



def warm_page_cache(folders) -> None:
    """Read every safetensors file of ``folders`` once, so the run that follows finds its inputs
    in the page cache whatever ran before it (another tool's multi-GB resident set, or the
    kernel's reclaim of pages left cold for a while, evicts them)."""
    buf = bytearray(16 * 1024**2)
    for folder in folders:
        for f in sorted(Path(folder).glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    b, f = ensure_1b_set()
    print(b, *f)
