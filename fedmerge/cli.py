"""The ``fedmerge`` command line: one entry point, one sub-command module per part.

Each module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
sub-commands and sets ``func`` on them. Heavy imports (torch, flwr, lm_eval) happen inside the
command functions, so ``fedmerge --help`` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fedmerge.errors import FedmergeError

COMMAND_MODULES = [
    "fedmerge.merging.commands",
    "fedmerge.eval.commands",
    "fedmerge.security.commands",
    "fedmerge.demo.commands",
    "fedmerge.federation.deployment_commands",
    "fedmerge.federation.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmerge",
        description="Federated model merging for medical LLMs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except FedmergeError as exc:
        print(f"fedmerge {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
