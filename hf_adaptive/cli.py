"""`hf-adaptive <subcommand>`: reads the command line, builds configs, calls library code.

Each subcommand lives in ``hf_adaptive/commands/<name>.py`` and exposes, accelerate-style,
``<name>_command_parser(subparsers)``; the parser it adds sets ``func`` to ``<name>_command(args)``.

Errors: a bad flag is argparse's usage error (exit code 2). An error raised by a command is printed as one line,
``hf-adaptive <command>: error: <message>``: exit code 2 for bad input (``ValueError`` / ``TypeError``, whose
messages name the field and a fix), 1 for anything else, 130 on Ctrl-C. ``--debug`` (anywhere on the command
line) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules under hf_adaptive.commands, each adding one subcommand (imported only when the CLI runs).
COMMAND_MODULES: tuple[str, ...] = (
    "generate",
    "eval",
    "launch",
    "simulate",
    "precision",
)


USAGE_ERROR, FAILURE, INTERRUPTED = 2, 1, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-adaptive", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (any position)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"hf_adaptive.commands.{name}")
        getattr(module, f"{name}_command_parser")(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # a top-level flag given after the subcommand: argparse would refuse it there
    args = build_parser().parse_args((["--debug"] if debug else []) + [a for a in argv if a != "--debug"])
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if debug:
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"hf-adaptive {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as err:  # the CLI's edge: one line for a person; --debug keeps the traceback
        print(error_line(args.command, err), file=sys.stderr)
        return USAGE_ERROR if isinstance(err, (ValueError, TypeError)) else FAILURE


def error_line(command: str, err: BaseException) -> str:
    """``hf-adaptive <command>: error: <message>`` on one line; the type is named when it is not bad input."""
    message = " ".join(str(err).split()) or type(err).__name__
    kind = "" if isinstance(err, (ValueError, TypeError)) else f"{type(err).__name__}: "
    hint = "" if kind == "" else " (run with --debug for the traceback)"
    return f"hf-adaptive {command}: error: {kind}{message}{hint}"


if __name__ == "__main__":
    sys.exit(main())
