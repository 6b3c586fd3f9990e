"""What compressing contributions (and the pushed model) costs in accuracy, on the demo world.

For each compression spec, the cached default demo world's hospitals are packed as a federation
round packs them (``pack_delta`` with the spec, signed; ``verify_package`` unpacks them as the
coordinator stores them, still encoded), merged with the demo federation's own strategy through
the engine, and, with ``--publish``, published as the coordinator does with the same spec
(``reference + decode(encode(merged - reference))``, what hospitals rebuild). Every model is
scored item by item on the demo's exams (lm-eval, the demo's evaluator settings, per-item
correctness from lm-eval's samples), and compared with the uncompressed federation's model by a
paired bootstrap over items (the same resampled items for both models; the statistic is the mean
over exams of exam accuracy, as the demo reports it): the difference and its 95% interval.
Seeded codecs (``sparse``) are run with several package seeds; their rows are listed per seed and
pooled (the items of every seed's model against the same uncompressed model).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/compression_accuracy.py [--publish] [--seeds 3] [--json out.json]

The world must already be in the cache (``fedmerge demo`` builds it); this script never builds one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPECS = ["none", "int8", "int4", "sparse:0.5", "sparse:0.5+int4", "sparse:0.25", "sparse:0.25+int4"]
BOOTSTRAP = 10_000


class ItemScorer:
    """Per-item correctness (1/0) of a model folder on the demo's exams, with the demo's settings."""

    def __init__(self, world, config):
        from fedmerge.eval.catalog import TaskCatalog

        self.catalog = TaskCatalog([world.tasks_dir])
        self.names = world.task_names
        self.settings = config.evaluation

    def score(self, folder: Path) -> dict[str, list[int]]:
        import lm_eval

        from fedmerge.eval import lmeval

        tasks = [self.catalog.build(n) for n in self.names]
        for t in tasks:
            t.set_fewshot_seed(seed=self.settings.seed)
        lm = lmeval.hf_lm(pretrained=str(folder), device="cpu", dtype="float32", batch_size=self.settings.batch_size, use_safetensors=True)
        seed = self.settings.seed
        out = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=self.catalog.task_manager, log_samples=True, num_fewshot=self.settings.num_fewshot,
            bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )  # fmt: skip
        items = {}
        for name in self.names:
            samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
            items[name] = [int(s["acc"]) for s in samples]
            assert abs(sum(items[name]) / len(items[name]) - out["results"][name]["acc,none"]) < 1e-9
        return items


def mean_of_exams(items: dict[str, list[int]]) -> float:
    return sum(sum(v) / len(v) for v in items.values()) / len(items)


def paired_bootstrap(model: list[dict[str, list[int]]], reference: dict[str, list[int]], iters: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float, float]:
    """(difference, 2.5%, 97.5%) of mean-of-exams accuracy, ``model`` (one or several seeds' runs,
    pooled) minus ``reference``, items resampled with replacement within each exam."""
    import numpy as np

    rng = np.random.default_rng(seed)
    exams = list(reference)
    ref = {e: np.asarray(reference[e], dtype=np.float64) for e in exams}
    runs = [{e: np.asarray(m[e], dtype=np.float64) for e in exams} for m in model]
    diff_point = float(np.mean([mean_of_exams(m) for m in model]) - mean_of_exams(reference))
    draws = np.zeros(iters)
    for e in exams:
        n = len(ref[e])
        idx = rng.integers(0, n, size=(iters, n))
        model_acc = np.mean([r[e][idx].mean(axis=1) for r in runs], axis=0)
        draws += (model_acc - ref[e][idx].mean(axis=1)) / len(exams)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return diff_point, float(lo), float(hi)


class Federation:
    """The demo hospitals packed, verified and merged as a round does it, under one compression spec."""

    def __init__(self, world, config, work: Path):
        from fedmerge.checkpoints import CheckpointReader, model_fingerprint
        from fedmerge.security.keys import generate_identity
        from fedmerge.security.trust import TrustStore

        self.world, self.config, self.work = world, config, work
        self.reference = model_fingerprint(CheckpointReader(world.base))
        self.trust = TrustStore(path=work / "trust.json")
        self.identities = {}
        for s in world.hospitals:
            self.identities[s] = generate_identity(s, work / "keys")
            self.trust.add(self.identities[s].public)

    def model(self, spec: str, seed: int, publish: bool, out: Path) -> Path:
        from fedmerge.checkpoints.codecs import parse_compression
        from fedmerge.checkpoints.rebuild import encode_model_delta, rebuild_model
        from fedmerge.merging.engine import MergeSpec, merge
        from fedmerge.merging.taskvector import DeltaCheckpoint
        from fedmerge.security.pack import pack_delta
        from fedmerge.security.verify import verify_package

        deltas = []
        for i, (specialty, folder) in enumerate(self.world.hospitals.items()):
            pkg = pack_delta(folder, self.world.base, out / f"pkg-{specialty}", self.identities[specialty], 1, self.reference,
                             compress=spec, compress_seed=1000 * seed + i)  # fmt: skip
            verify_package(pkg, self.trust, expected_round=1, expected_reference=self.reference, require_sealed=False,
                           expected_compression=spec, unpack_to=out / f"delta-{specialty}")  # fmt: skip
            deltas.append(DeltaCheckpoint(out / f"delta-{specialty}", label=specialty))
        fed = self.config.federation
        merged = merge(self.world.base, deltas, out / "merged", MergeSpec(method=fed.method, parameters=fed.parameters, seed=0, device="cpu"), progress=False).out_dir
        if not publish or spec == "none":
            return Path(merged)
        encode_model_delta(merged, self.world.base, out / "published-delta", parse_compression(spec), 77 + seed)
        return rebuild_model(self.world.base, out / "published-delta", out / "published", sidecars_from=merged)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=None, help="fedmerge cache root (default: $FEDMERGE_CACHE or ~/.cache/fedmerge)")
    ap.add_argument("--specs", default=",".join(SPECS), help="comma-separated compression specs (none is always the reference)")
    ap.add_argument("--seeds", type=int, default=3, help="package seeds for seeded codecs (sparse)")
    ap.add_argument("--publish", action="store_true", help="also push the merged model compressed with the same spec (what hospitals install)")
    ap.add_argument("--json", default=None, help="write the rows here (default: benchmarks/results/compression_accuracy.json)")
    args = ap.parse_args(argv)

    import logging
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-request bars
    for name in ("lm_eval", "lm-eval", "fedmerge", "transformers", "datasets", "httpx", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from fedmerge.checkpoints.codecs import canonical_spec, parse_compression
    from fedmerge.demo.config import DemoConfig
    from benchmarks.common import cached_demo_world

    config = DemoConfig()
    world = cached_demo_world(config, args.cache)
    if world is None:
        return 2
    scorer = ItemScorer(world, config)
    specs = [canonical_spec(s) for s in args.specs.split(",")]
    specs = ["none"] + [s for s in specs if s != "none"]
    work = Path(tempfile.mkdtemp(prefix="fedmerge-compression-"))
    rows, runs = [], {}
    try:
        fed = Federation(world, config, work)
        for spec in specs:
            seeded = any(st.codec.name == "sparse" for st in parse_compression(spec).stages)
            runs[spec] = []
            for seed in range(args.seeds if seeded else 1):
                out = work / f"{spec.replace(':', '_').replace('+', '-')}-{seed}"
                out.mkdir()
                runs[spec].append(scorer.score(fed.model(spec, seed, args.publish, out)))
                shutil.rmtree(out)
                print(f"{spec:20s} seed {seed}: mean {100 * mean_of_exams(runs[spec][-1]):5.1f}  "
                      + "  ".join(f"{e.removeprefix('demo_')[:10]} {100 * sum(v) / len(v):5.1f}" for e, v in runs[spec][-1].items()), flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reference = runs["none"][0]
    matrices = [(r, n) for r, n in _matrix_shapes(world.base)]
    bf16 = sum(r * n * 2 for r, n in matrices)
    print("\n| compression | bytes / bf16 (demo matrices) | mean acc | vs none [95% CI] | " + " | ".join(e.removeprefix("demo_") for e in reference) + " |")
    print("|---|---:|---:|---|" + "---:|" * len(reference))
    for spec in specs:
        diff, lo, hi = paired_bootstrap(runs[spec], reference) if spec != "none" else (0.0, 0.0, 0.0)
        ratio = sum(parse_compression(spec).nbytes((r, n), "BF16") for r, n in matrices) / bf16
        exams = {e: sum(sum(m[e]) / len(m[e]) for m in runs[spec]) / len(runs[spec]) for e in reference}
        rows.append({"spec": spec, "seeds": len(runs[spec]), "bytes_over_bf16": ratio, "mean": sum(mean_of_exams(m) for m in runs[spec]) / len(runs[spec]),
                     "diff_vs_none": diff, "ci95": [lo, hi], "exams": exams, "per_seed_mean": [mean_of_exams(m) for m in runs[spec]]})  # fmt: skip
        ci = "" if spec == "none" else f"{100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        print(f"| {spec}{f' ({len(runs[spec])} seeds)' if len(runs[spec]) > 1 else ''} | {ratio:.3f} | {100 * rows[-1]['mean']:.1f} | {ci} | "
              + " | ".join(f"{100 * v:.1f}" for v in exams.values()) + " |")  # fmt: skip
    items = {e: len(v) for e, v in reference.items()}
    print(f"\nworld {world.manifest['key']}, federation {config.federation.method} {config.federation.parameters}, "
          f"{'contributions and pushed model' if args.publish else 'contributions'} compressed; items per exam {items}")  # fmt: skip
    from benchmarks.common import write_results

    write_results({"world": world.manifest["key"], "publish": args.publish, "items": items, "rows": rows}, args.json, "compression_accuracy")
    return 0


def _matrix_shapes(folder: Path):
    from fedmerge.checkpoints import CheckpointReader

    for info in CheckpointReader(folder).infos():
        if len(info.shape) >= 2:
            yield info.shape[0], info.numel // info.shape[0]


if __name__ == "__main__":
    sys.exit(main())
