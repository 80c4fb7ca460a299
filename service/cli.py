"""The ``mnemosyne`` command.

Sub-commands live in ``service/commands/<name>.py``; each module exposes
``register(subparsers)`` which adds its parser and sets ``func`` (a callable
taking the parsed args and returning an exit code). Commands whose optional
dependencies are not installed are left out instead of breaking ``--help``.

Errors meant for the user are raised as :class:`CLIError`; ``main`` prints them
as one line on stderr and exits with their code. Exit codes: 0 ok, 1 failure (the
work, or a service it needs, failed), 2 usage (bad arguments, config or input),
130 interrupted. Any other exception is one line and exit 1 as well
(``MNEMOSYNE_TRACEBACK=1`` re-raises it with its traceback).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMAND_MODULES = ("meta_train", "evaluate", "registry", "robotics")


# Exit codes of every command (README): 0 ok, 1 failure (the work or a service it needs failed),
# 2 usage (bad arguments, config or input), 130 interrupted.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
UNREACHABLE_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(" ".join(str(message).split()))  # one line, whatever the cause's text held
        self.code = code


def service_error(exc: BaseException | None) -> BaseException | None:
    """The registry (gRPC) error in ``exc``'s cause chain whose code says the service could not be
    reached (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``), or ``None``: an unreachable service is a
    failure (exit 1), not a usage error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = getattr(exc, "code", None)
        if callable(code):  # a raw grpc.RpcError
            code = getattr(code(), "name", None)
        if code in UNREACHABLE_CODES:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


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
        return EXIT_INTERRUPTED
    except Exception as exc:
        if os.environ.get("MNEMOSYNE_TRACEBACK"):
            raise
        text = " ".join(str(exc).split()) or "(no message)"
        kind = "cannot reach the service" if service_error(exc) is not None else type(exc).__name__
        print(f"mnemosyne: error: {kind}: {text} (MNEMOSYNE_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    # Run through the importable module so that `python -m service.cli` and the
    # console script share one CLIError class (commands import it from here).
    from service import cli as _cli  # noqa: PLW0406 - deliberate, see above

    sys.exit(_cli.main())
