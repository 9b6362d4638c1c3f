"""The ``kappatune`` command: one module per command group, each command parses, calls one library function
and writes its output.

Progress and logs go to stderr; results to stdout or a file. A problem with the input prints one line
``kappatune: error: ...`` on stderr and exits with status 2, leaving no output file behind. Nothing here
imports torch before a command runs (``kappatune --help`` / ``--version`` stay fast).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..errors import KappaTuneError, TrainingInterrupted
from . import experiments, scan, select, speech, train
from .train import LORA_TARGETS_HELP  # noqa: F401  (public: the LoRA targets shown in --help)

COMMAND_GROUPS = (scan, select, train, experiments, speech)  # the order of the commands in --help

DESCRIPTION = """\
Fine-tune a pretrained model on a new task or input modality without destroying what it already knows.
kappatune measures the condition number (kappa) of every weight matrix, and trains only the lowest-kappa
ones (the least specialised), leaving every other tensor bit-identical (KappaTune).

example:
  kappatune scan path/to/model -o report.json && kappatune select report.json --budget-params 20M -o sel.json"""

EPILOG = "Run 'kappatune COMMAND --help' for a command's options; every option: docs/cli.md."


def parser_with_commands() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``kappatune`` parser and its command parsers by name (for docs/cli.md)."""
    p = argparse.ArgumentParser(prog="kappatune", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"kappatune {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    return p, dict(sub.choices)


def build_parser() -> argparse.ArgumentParser:
    return parser_with_commands()[0]


def _configure_logging(verbose: bool) -> None:
    lg = logging.getLogger("kappatune")
    if not lg.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        lg.addHandler(h)
    lg.setLevel(logging.DEBUG if verbose else logging.INFO)
    lg.propagate = False


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "func", None):
        parser.print_help(sys.stderr)
        return 2
    _configure_logging(a.verbose)
    try:
        return int(a.func(a) or 0)
    except TrainingInterrupted as e:
        print(f"kappatune: {e}", file=sys.stderr)
        return 130
    except KappaTuneError as e:
        print(f"kappatune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kappatune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
