"""The ``fedmerge`` command line: one entry point, one sub-command module per part.

Each module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
sub-commands and sets ``func`` on them. Heavy imports (torch, flwr, lm_eval) happen inside the
command functions, so ``fedmerge --help`` starts fast.

Global flags work anywhere on the line (``fedmerge -v merge ...`` and ``fedmerge merge ... -v``):
``-v`` logs debug details and lets libraries speak, ``-q`` keeps to warnings and the result, and
``--version`` prints the version. Log lines are written through the progress bars, so a bar is
redrawn below them instead of being broken by them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fedmerge import __version__, console
from fedmerge.errors import FedmergeError

COMMAND_MODULES = [
    "fedmerge.merging.commands",
    "fedmerge.eval.commands",
    "fedmerge.security.commands",
    "fedmerge.demo.commands",
    "fedmerge.federation.deployment_commands",
    "fedmerge.server.status",
    "fedmerge.federation.commands",
]

_VERBOSE_HELP = "log debug details and let libraries print their own progress and warnings"
_QUIET_HELP = "print only warnings, errors and the result (no progress bars); for scripts"


def _add_global_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    # On sub-commands the defaults are suppressed, so a flag given before the sub-command is
    # not reset by the sub-command's parser.
    default_v = 0 if top else argparse.SUPPRESS
    default_q = False if top else argparse.SUPPRESS
    parser.add_argument("-v", "--verbose", action="count", default=default_v, help=_VERBOSE_HELP)
    parser.add_argument("-q", "--quiet", action="store_true", default=default_q, help=_QUIET_HELP)


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield sub
                yield from _subparsers(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmerge", description="Federated model merging for medical LLMs.")
    parser.add_argument("--version", action="version", version=f"fedmerge {__version__}", help="print the version and exit")
    _add_global_flags(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", help="the sub-command to run (each has its own --help)")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for sub in _subparsers(parser):
        if "-v" not in sub._option_string_actions and "-q" not in sub._option_string_actions:
            _add_global_flags(sub, top=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console.setup(console.verbosity_from_args(args))
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
