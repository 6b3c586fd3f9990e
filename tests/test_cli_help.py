"""Every sub-command and every option of the ``fedmerge`` command line says what it is for."""

from __future__ import annotations

import argparse

from fedmerge.cli import build_parser


def _missing_help(parser: argparse.ArgumentParser, path: list[str]) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if not helps.get(name):
                    missing.append(" ".join([*path, name]) + " (the command itself)")
                missing += _missing_help(sub, [*path, name])
        elif action.help is None and not isinstance(action, argparse._HelpAction):
            missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_command_and_option_has_help():
    assert _missing_help(build_parser(), ["fedmerge"]) == []


def test_the_walk_finds_a_missing_help():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    p = sub.add_parser("x", help="does x")
    p.add_argument("--y")
    sub.add_parser("z")
    assert _missing_help(parser, ["prog"]) == ["prog x --y", "prog z (the command itself)"]
