"""CLI: ``simulate`` — a whole federation on one machine, N institutions a parameter."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="run federation rounds on this machine (same ServerApp/ClientApp, no SuperLink)",
        description="Run the rounds of CONFIG with simulated hospitals, under Flower's simulation engine (default) or "
        "in this process. CONFIG names a federation config and its client configs, or asks for toy institutions "
        "built on the spot.",
    )
    p.add_argument("config", metavar="CONFIG", help="simulation YAML (see configs/federation/simulate.yaml)")
    p.add_argument("--institutions", type=int, default=None, help="number of toy institutions (overrides the config)")
    p.add_argument("--engine", choices=["flower", "inprocess"], default=None, help="override the config's engine")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--overwrite", action="store_true", help="run again from nothing: replace the toy layout in work_dir, or delete the federation's state folders")
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    import json

    from fedmerge.federation.simulate import run_from_config

    report = run_from_config(args.config, institutions=args.institutions, engine=args.engine, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for r in report.rounds:
            rec = r.record
            print(
                f"round {r.round}: {r.status}; contributors {', '.join(rec.contributors)}; "
                f"rejected {len(rec.rejections)}; dropped {len(rec.drops)}; late {len(rec.late)}; model {r.model_dir}"
            )
    return 0 if all(r.status == "completed" for r in report.rounds) else 1
