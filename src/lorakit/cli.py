"""The `lorakit` command: a table of subcommands, each a thin module over the Python API.

Every `lorakit.commands.<name>` module defines `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`, and imports torch/transformers only inside `run`. Only the command being
run gets its arguments built, so `lorakit --help` imports no command's dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import NoReturn

PROG = "lorakit"

# name -> module, in the order `lorakit --help` lists them
COMMANDS: dict[str, str] = {
    "demo": "lorakit.commands.demo",
    "train": "lorakit.commands.train",
    "generate": "lorakit.commands.generate",
    "chat": "lorakit.commands.chat",
    "serve": "lorakit.commands.serve",
    "merge": "lorakit.commands.merge",
    "quantize": "lorakit.commands.quantize",
    "export": "lorakit.commands.export",
    "inspect": "lorakit.commands.inspect",
    "check": "lorakit.commands.check",
    "estimate": "lorakit.commands.estimate",
}

# Bad input from the user: reported as one line, exit status 2. Anything else is a bug: traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)
EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def load_commands() -> dict[str, ModuleType]:
    """Every command module in the table; one that is missing fails here, not by vanishing from --help."""
    return {name: importlib.import_module(module_path) for name, module_path in COMMANDS.items()}


def build_parser(selected: str | None = None) -> Parser:
    """The full parser; only `selected`'s arguments are built (None: only the command list)."""
    from . import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    parser = Parser(
        prog=PROG,
        description="Fast, light LoRA fine-tuning with PEFT-compatible adapters.",
        epilog=f"Run '{PROG} COMMAND --help' for a command's options. Start with '{PROG} demo'.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, module in load_commands().items():
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP, parents=[common])
        if name == selected:
            module.add_arguments(cmd)
            cmd.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (2 for bad input, with a one-line message)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_in(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, usage errors: argparse has printed what to say
        return 0 if done.code is None else done.code if isinstance(done.code, int) else EXIT_USAGE
    if getattr(args, "run", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        with _one_line_warnings():
            return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lorakit … | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option)."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def _one_line(message: object) -> str:
    """A message on one line (multi-line messages are joined), never empty."""
    text = " ".join(str(message).split())
    return text or type(message).__name__


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings print as `lorakit: warning: …`, without the source line Python adds."""
    with warnings.catch_warnings():
        def show(message, category, filename, lineno, file=None, line=None) -> None:
            print(f"{PROG}: warning: {_one_line(message)}", file=file or sys.stderr)

        warnings.showwarning = show
        yield


if __name__ == "__main__":
    sys.exit(main())
