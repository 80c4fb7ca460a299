"""The ``mnemosyne`` command.

Sub-commands live in ``service/commands/<name>.py``; each module exposes
``register(subparsers)`` which adds its parser and sets ``func`` (a callable
taking the parsed args and returning an exit code). Commands whose optional
dependencies are not installed are left out instead of breaking ``--help``.

Errors meant for the user are raised as :class:`CLIError`; ``main`` prints them
as one line on stderr and exits with their code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("meta_train", "evaluate", "registry", "robotics")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnemosyne",
        description="Mnemosyne learned optimizers: meta-train, evaluate, serve and use them.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module_name = f"service.commands.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # not written yet / not shipped in this build
            raise
        module.register(sub)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return f"mnemosyne {version('mnemosyne')}"
    except PackageNotFoundError:  # pragma: no cover - not installed as a distribution
        return "mnemosyne (source tree)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"mnemosyne: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("mnemosyne: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run through the importable module so that `python -m service.cli` and the
    # console script share one CLIError class (commands import it from here).
    from service import cli as _cli  # noqa: PLW0406 - deliberate, see above

    sys.exit(_cli.main())
