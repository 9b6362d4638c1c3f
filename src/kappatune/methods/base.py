"""The method registry: how a training method plugs into ``kappatune train`` / ``compare``.

A method is one module in this package that calls ``register(Method(...))`` at import time. Its ``prepare``
receives the model, a ``MethodContext`` (``ctx.report()`` returns the model's kappa report, scanned on first
call so that methods that need no report never pay for a scan; ``ctx.tokenizer`` is the run's tokenizer) and
the ``TrainConfig``; it returns a ``Prepared``: the model to hand to
the Trainer (possibly a PEFT wrapper), the trainable summary, and which tensors of the final (merged) model
training may change, so that the recipe can prove every other tensor bit-identical.

Options a method reads beyond the shared ``TrainConfig`` fields live in its own small dataclass
(``Method.options``); users pass them as ``TrainConfig.method_options`` / ``--method-option key=value``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import KappaTuneError
from ..freeze import TrainableSummary
from ..report import KappaReport, Selection



@dataclass
class MethodContext:
    """What the recipe offers a method besides the model and the config."""

    report: Callable[[], KappaReport]   # the model's kappa report (scanned on the first call)
    tokenizer: Any = None               # the run's tokenizer (None where the caller has none, e.g. speech LLMs)


@dataclass
class Prepared:
    """A model made ready to train by a method."""

    model: torch.nn.Module
    summary: TrainableSummary
    selection: Selection | None = None          # selective methods: what was selected (saved as selection.json)
    info: dict = field(default_factory=dict)    # method facts for the run's summary (rank, modules, ...)
    is_peft: bool = False                       # model is a PEFT wrapper: merge_and_unload() before saving
    may_change: set[str] | None = None          # names in the final (merged) model allowed to move; None: all


@dataclass(frozen=True)
class Method:
    name: str
    prepare: Callable[[torch.nn.Module, MethodContext, Any], Prepared]
    help: str
    options: type | None = None   # dataclass of this method's own options (defaults + help + validation)
    needs_budget: bool = True     # reads TrainConfig.budget_params
    family: str = "selective"     # selective | adapter | full: how compare groups and explains it


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise KappaTuneError(f"training method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KappaTuneError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_options(method: Method, values: dict | None) -> Any:
    """The method's options dataclass built from ``values`` (strings from the CLI are converted to each
    field's type); unknown keys are an error naming the method's options."""
    values = dict(values or {})
    if method.options is None:
        if values:
            raise KappaTuneError(f"method {method.name!r} takes no method options (got {', '.join(values)})")
        return None
    fields = {f.name: f for f in dataclasses.fields(method.options)}
    unknown = sorted(set(values) - fields.keys())
    if unknown:
        raise KappaTuneError(f"method {method.name!r} has no option {unknown[0]!r}; its options: "
                             f"{', '.join(fields) or 'none'}")
    return method.options(**{k: _convert(v, fields[k], method.name) for k, v in values.items()})


def _convert(value: Any, f: dataclasses.Field, method: str) -> Any:
    if not isinstance(value, str):
        return value
    kind = str(f.type)
    try:
        if "bool" in kind:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if "int" in kind and "float" not in kind:
            return int(value)
        if "float" in kind:
            return float(value)
    except ValueError:
        raise KappaTuneError(f"method {method!r} option {f.name}: cannot read {value!r} as {kind}") from None
    return value


def options_help(method: Method) -> str:
    """One line per option: name (type, default): help."""
    if method.options is None:
        return ""
    return "\n".join(f"{f.name} ({f.type}, default {f.default!r}): {f.metadata.get('help', '')}"
                     for f in dataclasses.fields(method.options))


def trainable_summary(model: torch.nn.Module) -> TrainableSummary:
    """The summary of whatever currently requires grad (for methods that freeze through another library)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return TrainableSummary(trainable, sum(p.numel() for p in model.parameters()), names)
