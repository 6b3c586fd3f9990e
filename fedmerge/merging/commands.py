"""CLI sub-commands of the merge library: ``merge``, ``inspect``, ``strategies``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("strategies", help="list the merge methods and their parameters")
    p.set_defaults(func=_cmd_strategies)


def _cmd_strategies(args: argparse.Namespace) -> int:
    from fedmerge.merging.strategies import available

    for name, entry in available().items():
        params = ", ".join(entry.cls.Params.model_fields)
        per_model = ", ".join(entry.cls.PerModel.model_fields)
        print(f"{name:18s} {entry.summary}")
        print(f"{'':18s}   parameters: {params or '-'}; per model: {per_model or '-'}")
    return 0
