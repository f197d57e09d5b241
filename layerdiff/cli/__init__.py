"""Command line: ``python -m layerdiff <command> ...``.

The ``layerdiff.cli`` package holds argparse only: one module per command group, each exposing
``register(subparsers)``, which adds its sub-command with
``set_defaults(func=run)``; ``run(args) -> int`` returns the exit code. User errors
(:class:`layerdiff.errors.LayerDiffError`, missing files, unwritable folders) print one line on
stderr and exit non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from layerdiff import __version__
from layerdiff.errors import LayerDiffError

# (module, attribute) pairs registering sub-commands; imported lazily so that ``--help`` stays fast
# and one broken optional feature never takes the whole command line down.
_COMMANDS = [
    ("layerdiff.cli.models", "register"),  # info, convert
    ("layerdiff.cli.generate", "register"),  # generate
    ("layerdiff.cli.bench", "register"),  # bench
    ("layerdiff.cli.train", "register"),  # train
    ("layerdiff.cli.evaluate", "register"),  # eval
    ("layerdiff.cli.calibrate", "register"),  # calibrate
]
_DATA_COMMANDS = [
    ("layerdiff.cli.data", "register"),  # data toy, data inspect
    ("layerdiff.cli.build", "register"),  # data build
]


def _register_all(sub, table) -> None:
    for module_name, attr in table:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # feature not present in this build
            raise
        getattr(module, attr)(sub)


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (the usage itself is one --help away); sub-command
    parsers are made with the same class."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m layerdiff", description="LayerDiff: layered image generation.")
    parser.add_argument("--version", action="version", version=f"layerdiff {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _register_all(sub, _COMMANDS)
    data = sub.add_parser("data", help="build, generate and inspect layered training data")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    _register_all(data_sub, _DATA_COMMANDS)
    data.set_defaults(func=lambda args: (data.print_help(sys.stderr), 2)[1])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (LayerDiffError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory: lower --batch, --width/--height or the number of layers", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
