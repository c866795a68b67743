"""The package's public surface: lazy exports resolve, importing has no heavy side effects, the CLI lists its commands."""

import subprocess
import sys

import hf_adaptive
from hf_adaptive.cli import COMMAND_MODULES, build_parser


def test_every_export_resolves():
    """Guards against an _EXPORTS entry pointing at a renamed module or symbol (fails only when used)."""
    for name in hf_adaptive.__all__:
        assert getattr(hf_adaptive, name) is not None, name


def test_import_is_cheap_and_side_effect_free():
    """Guards against `import hf_adaptive` pulling torch/transformers in (house rule: no work at import)."""
    code = "import sys, hf_adaptive; print(int('torch' in sys.modules), int('transformers' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0"]


def test_cli_has_every_subcommand():
    """Guards against a command module listed in COMMAND_MODULES that fails to import or to register."""
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert set(COMMAND_MODULES) <= set(choices)
