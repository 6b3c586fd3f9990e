"""Offline comparison of merge strategies on the cached demo world (weights only, no federation).

Merges the hospitals' fine-tunes (task vectors against the demo's base, the same deltas the
federation's coordinator receives) with each configuration below through the engine, scores the
base, every hospital and every merge with the demo's evaluator settings (lm-eval on the local exam
tasks, 0-shot, seed 1234), and prints per-exam accuracy, the mean over exams and the gap of the
mean to the best single hospital. Nothing is chosen here: it is a map for deciding what to try.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/demo_strategies.py [--cache DIR] [--json out.json]

The world must already be in the cache (``fedmerge demo`` builds it); this script never builds one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (label, method, parameters): the strategies and settings compared.
MERGES: list[tuple[str, str, dict]] = [
    ("linear", "linear", {}),
    ("task_arithmetic w=0.33", "task_arithmetic", {"weight": 0.33}),
    ("task_arithmetic w=0.5", "task_arithmetic", {"weight": 0.5}),
    ("ties d=1.0", "ties", {"density": 1.0}),
    ("ties d=0.6", "ties", {"density": 0.6}),
    ("iso_c a=0.5", "iso_c", {"alpha": 0.5}),
    ("iso_c a=0.75", "iso_c", {"alpha": 0.75}),
    ("iso_c a=1.0", "iso_c", {"alpha": 1.0}),
    ("iso_cts a=1.0", "iso_cts", {"alpha": 1.0}),
    ("tsv_m a=1.0", "tsv_m", {"alpha": 1.0}),
    # the same with embeddings and LM head merged by the mean instead of spectrally
    ("iso_c a=0.75 tables=mean", "iso_c", {"alpha": 0.75, "token_tables": "mean"}),
    ("iso_c a=1.0 tables=mean", "iso_c", {"alpha": 1.0, "token_tables": "mean"}),
    ("iso_cts a=1.0 tables=mean", "iso_cts", {"alpha": 1.0, "token_tables": "mean"}),
    ("tsv_m a=1.0 tables=mean", "tsv_m", {"alpha": 1.0, "token_tables": "mean"}),
    ("model_stock", "model_stock", {}),
    ("hierarchical reference", "hierarchical", {"mode": "reference"}),
    ("hierarchical symmetric", "hierarchical", {"mode": "symmetric"}),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=None, help="fedmerge cache root (default: $FEDMERGE_CACHE or ~/.cache/fedmerge)")
    ap.add_argument("--json", default=None, help="write the rows here (default: benchmarks/results/demo_strategies.json)")
    ap.add_argument("--only", default=None, help="comma-separated labels of MERGES to run (default: all)")
    args = ap.parse_args(argv)

    from fedmerge import console

    console.setup(console.QUIET)  # libraries silenced; this script prints its own lines

    from fedmerge.demo.config import DemoConfig
    from benchmarks.common import cached_demo_world
    from fedmerge.eval.config import EvalConfig
    from fedmerge.eval.evaluator import Evaluator
    from fedmerge.merging.engine import MergeSpec, merge

    config = DemoConfig()
    world = cached_demo_world(config, args.cache)
    if world is None:
        return 2
    tasks = world.task_names
    evaluator = Evaluator(
        EvalConfig(
            tasks=tasks,
            task_dirs=[world.tasks_dir],
            num_fewshot=config.evaluation.num_fewshot,
            device="cpu",
            dtype="float32",
            batch_size=config.evaluation.batch_size,
            seed=config.evaluation.seed,
            store=None,
            bootstrap_iters=100,
        ),
        store=None,
    )

    rows: list[dict] = []

    def score(label: str, role: str, folder: Path, method: str | None = None, params: dict | None = None, merge_s: float | None = None) -> None:
        res = evaluator.evaluate(str(folder), label=label, role=role, strategy=method, params=params)
        acc = {t: res.value(t) for t in tasks}
        rows.append({"label": label, "role": role, "method": method, "parameters": params or {}, "acc": acc, "mean": sum(acc.values()) / len(acc), "merge_seconds": merge_s})
        print(f"{label:28s} " + "  ".join(f"{t.removeprefix('demo_')[:10]} {100 * a:5.1f}" for t, a in acc.items()) + f"  mean {100 * rows[-1]['mean']:5.1f}", flush=True)

    score("base", "base", world.base)
    for specialty, folder in world.hospitals.items():
        score(f"hospital {specialty}", "parent", folder)
    wanted = set(args.only.split(",")) if args.only else None
    work = Path(tempfile.mkdtemp(prefix="fedmerge-science-"))
    try:
        inputs = list(world.hospitals.values())
        for label, method, params in MERGES:
            if wanted is not None and label not in wanted:
                continue
            out = work / label.replace(" ", "_")
            t0 = time.perf_counter()
            merge(world.base, inputs, out, MergeSpec(method=method, parameters=params, seed=0, device="cpu"), progress=False)
            score(label, "merge", out, method, params, time.perf_counter() - t0)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best = max((r for r in rows if r["role"] == "parent"), key=lambda r: r["mean"])
    print()
    header = "| model | " + " | ".join(t.removeprefix("demo_") for t in tasks) + " | mean | vs best hospital |"
    print(header)
    print("|" + "---|" * (len(tasks) + 3))
    for r in rows:
        gap = 100 * (r["mean"] - best["mean"])
        r["gap_to_best_hospital"] = r["mean"] - best["mean"]
        print(f"| {r['label']} | " + " | ".join(f"{100 * r['acc'][t]:.1f}" for t in tasks) + f" | {100 * r['mean']:.1f} | {gap:+.1f} |")
    print(f"\nbest single hospital: {best['label']} (mean {100 * best['mean']:.1f}); {len(tasks)} exams of {world.manifest['exam_items']} items")
    from benchmarks.common import write_results

    write_results({"world": world.manifest["key"], "tasks": tasks, "rows": rows}, args.json, "demo_strategies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
