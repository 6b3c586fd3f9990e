"""``fedmerge demo``: the paper's experiment in miniature, from nothing, on a CPU."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="build a tiny medical world, run a federation round, compare every merge strategy",
        description="Builds (once, cached) a tiny Mistral base and three hospitals' fine-tunes on synthetic "
        "specialties, runs a federation round with signed contributions, merges them with every strategy, "
        "scores everything with the evaluator and writes a report.",
    )
    p.add_argument("--config", help="demo YAML (default: the built-in demo, same as configs/demo.yaml)")
    p.add_argument("--out", default="fedmerge-demo", help="output folder (default: ./fedmerge-demo)")
    p.add_argument("--cache", help="cache root (default: $FEDMERGE_CACHE or ~/.cache/fedmerge)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the world even if it is cached")
    p.add_argument("--keep-models", action="store_true", help="keep every merged model under OUT/models")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    import os

    # Before torch loads its OpenMP runtime: idle worker threads sleep instead of spinning. On a
    # busy machine spinning threads burn the cores the other thread needs (measured here: a
    # training step 7x slower in wall time with the default policy on a loaded 2-core machine).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from fedmerge.demo.config import load_demo_config
    from fedmerge.demo.run import run_demo

    config = load_demo_config(args.config)
    result = run_demo(
        config,
        args.out,
        cache=args.cache,
        rebuild=args.rebuild,
        keep_models=args.keep_models,
        quiet_libraries=not getattr(args, "verbose", False),
    )
    print()
    print(result.table)
    print()
    print(f"report:  {result.report}")
    print(f"results: {result.results} (and {result.out / 'results.db'})")
    print(f"plots:   {result.out / 'evaluation'} and {result.out / 'density_sweep.png'}")
    return 0
