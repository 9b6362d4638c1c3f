"""kappatune select: the options are built from policies.SelectConfig and the ORDERS / SIZE_RULES registries."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from ..policies import SIZE_RULES, SelectConfig
from .common import add_command, add_order_argument, write_json

log = logging.getLogger("kappatune")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_select_options(p: argparse.ArgumentParser) -> None:
    """One option per SelectConfig field (help from the field); the size rules as a required exclusive group."""
    g = p.add_mutually_exclusive_group(required=True)
    for rule in SIZE_RULES.values():  # read as text: SelectConfig parses and checks them (one-line errors)
        g.add_argument(_flag(rule.name), dest=rule.name, metavar=rule.metavar, help=rule.help)
    for f in dataclasses.fields(SelectConfig):
        meta = f.metadata
        if f.name in SIZE_RULES:
            continue
        if f.name == "order":
            add_order_argument(p, default=f.default, help=meta["help"])
            continue
        kw: dict = {"dest": f.name, "help": meta["help"]}
        if f.default is False:
            kw["action"] = "store_true"
        else:
            kw["metavar"] = meta.get("metavar")
            if isinstance(f.default, tuple):
                kw["action"] = "append"
            else:
                kw.update(type=meta.get("type", str), default=f.default)
        p.add_argument(meta.get("flag", _flag(f.name)), **kw)


def config_from_args(a: argparse.Namespace) -> SelectConfig:
    """The SelectConfig of parsed select options (``--like`` read as a selection file)."""
    from ..report import Selection

    kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(SelectConfig)}
    kw["like"] = Selection.load(a.like) if a.like else None
    return SelectConfig(**kw)


def register(sub) -> None:
    p = add_command(
        sub, "select", func=cmd_select, help="choose which tensors to train from a report; export to PEFT/Axolotl",
        description="Chooses the tensors to fine-tune from a scan report: by default the lowest-kappa ones (the "
                    "least specialised, so training them disturbs least of what the model knows), up to a "
                    "count, a parameter budget, a fraction or a kappa threshold. Writes the selection for "
                    "`kappatune train` / kappatune.apply, and optionally as PEFT target modules, Axolotl "
                    "unfrozen_parameters or CSV.",
        example="kappatune select report.json --budget-params 20M -o selection.json --peft peft.json")
    p.add_argument("report", help="a report JSON written by kappatune scan")
    add_select_options(p)
    p.add_argument("--output", "-o", help="selection JSON (default: stdout)")
    p.add_argument("--axolotl", help="also write Axolotl unfrozen_parameters YAML")
    p.add_argument("--peft", help="also write PEFT LoraConfig kwargs JSON (target_modules/target_parameters)")
    p.add_argument("--csv", help="also write the selection as CSV")


def cmd_select(a) -> int:
    from .._io import atomic_write_json, atomic_write_text
    from ..policies import select
    from ..report import KappaReport

    sel = select(KappaReport.load(a.report), config_from_args(a))
    # Build every export first, so that a refused export leaves no file at all.
    outs = []
    if a.axolotl:
        outs.append((atomic_write_text, a.axolotl, sel.to_axolotl_yaml()))
    if a.peft:
        outs.append((atomic_write_json, a.peft, sel.to_peft_kwargs()))
    if a.csv:
        outs.append((atomic_write_text, a.csv, sel.to_csv()))
    write_json(sel.to_dict(), a.output)
    for write, path, content in outs:
        write(path, content)
    log.info("selected %d units, %s parameters", sel.count, f"{sel.total_params:,}")
    return 0
