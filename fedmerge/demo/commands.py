"""``fedmerge demo``: a federation of tiny medical hospitals against its best hospital, from nothing, on a CPU."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="build a tiny medical world, run a federation, compare every merge strategy against the best hospital",
        description="Builds (once, cached) a tiny Mistral base and three hospitals' fine-tunes on synthetic specialties, "
        "runs a multi-round federation (signed and sealed contributions, local training between rounds, the published "
        "model chosen on validation data only), merges the first round's contributions with every strategy, scores "
        "everything on test exams and writes a report with paired bootstrap intervals.",
    )
    p.add_argument("--config", help="demo YAML (default: the built-in demo, same as configs/demo.yaml)")
    p.add_argument("--out", default="fedmerge-demo", help="output folder (default: ./fedmerge-demo)")
    p.add_argument("--cache", help="cache root (default: $FEDMERGE_CACHE or ~/.cache/fedmerge)")
    p.add_argument("--seeds", type=_at_least_one, default=1, metavar="N",
                   help="run N worlds (world.seed, world.seed + 1, ...) and pool them in the report (default: 1)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the world even if it is cached")
    p.add_argument("--keep-models", action="store_true", help="keep every merged model under OUT/models")
    p.set_defaults(func=_cmd_demo)


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of worlds, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"at least one world, got {n}")
    return n


def _cmd_demo(args: argparse.Namespace) -> int:
    import os

    # Before torch loads its OpenMP runtime: idle worker threads sleep instead of spinning. On a
    # busy machine spinning threads burn the cores the other thread needs (measured here: a
    # training step 7x slower in wall time with the default policy on a loaded 2-core machine).
    # The hospitals' training hooks inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from fedmerge.demo.config import load_demo_config
    from fedmerge.demo.run import run_demo

    config = load_demo_config(args.config)
    result = run_demo(config, args.out, cache=args.cache, rebuild=args.rebuild, keep_models=args.keep_models, seeds=args.seeds)
    print()
    print(result.table)
    print()
    print(result.headline)
    print()
    print(f"report:  {result.report}")
    print(f"results: {result.results}")
    print(f"plots:   {result.out}/rounds.png, general_vs_specialties.png, density_sweep.png")
    return 0
