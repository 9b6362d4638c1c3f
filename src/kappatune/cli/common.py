"""What every command shares: how a command is declared, how results are written, shared options."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Any, Callable

from ..policies import ORDERS


def add_command(sub, name: str, *, help: str, description: str, example: str,
                func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """A subcommand whose --help starts with what it does for the user and ends with an example."""
    text = "\n".join(textwrap.fill(par, 100) for par in description.strip().split("\n"))
    p = sub.add_parser(name, help=help, description=text, epilog="example:\n  " + example,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


def add_order_argument(p: argparse.ArgumentParser, *, default: str = "lowest", help: str = "which units come first",
                       flag: str = "--order") -> None:
    """``--order`` with the choices and their one-line help taken from the ORDERS registry."""
    p.add_argument(flag, default=default, choices=list(ORDERS), metavar="ORDER",
                   help=f"{help} (default {default}); one of: " + "; ".join(
                       f"{o.name}: {o.help}" for o in ORDERS.values()))


def add_train_options(p: argparse.ArgumentParser, demo: bool = False) -> None:
    """The options shared by train, demo and compare."""
    p.add_argument("--budget-params", default="2M", help="trainable parameters (20M, 1.5k); all methods but full")
    p.add_argument("--epochs", type=float, default=2.0 if demo else 3.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


def is_main_rank() -> bool:
    """False on the non-zero ranks of a torchrun / accelerate launch: only rank 0 writes results."""
    return int(os.environ.get("RANK", "0")) == 0


def write_json(obj: Any, path: str | None) -> None:
    """JSON to ``path`` (atomically) or to stdout."""
    from .._io import atomic_write_json, dumps

    if path:
        atomic_write_json(path, obj)
    else:
        sys.stdout.write(dumps(obj))


def csv_list(s: str | None) -> tuple[str, ...]:
    """'a,b,,c' -> ('a', 'b', 'c')."""
    return tuple(x.strip() for x in (s or "").split(",") if x.strip())
