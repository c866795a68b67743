"""`hf-adaptive <subcommand>`: reads the command line, builds configs, calls library code.

Each subcommand lives in ``hf_adaptive/commands/<name>.py`` and exposes, accelerate-style,
``<name>_command_parser(subparsers)``; the parser it adds sets ``func`` to ``<name>_command(args)``.
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-adaptive", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"hf_adaptive.commands.{name}")
        getattr(module, f"{name}_command_parser")(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
