"""kappatune: fine-tune the lowest-condition-number tensors of a pretrained model (KappaTune).

Public API (imported lazily so that ``kappatune --version`` stays fast)::

    report = kappatune.scan(model_or_path)
    selection = kappatune.select(report, budget_params=20_000_000)
    summary = kappatune.apply(model, selection)

Module names differ from the function names on purpose (scanner.scan, policies.select, freeze.apply): a
submodule named like a function would replace it as a package attribute once imported.
"""

__version__ = "0.1.0"

_LAZY = {
    "scan": ("scanner", "scan"),
    "select": ("policies", "select"),
    "apply": ("freeze", "apply"),
    "snapshot": ("freeze", "snapshot"),
    "changed": ("freeze", "changed"),
    "TrainableSummary": ("freeze", "TrainableSummary"),
    "KappaReport": ("report", "KappaReport"),
    "Selection": ("report", "Selection"),
    "UnitResult": ("report", "UnitResult"),
    "spectrum": ("spectral", "spectrum"),
    "Spectrum": ("spectral", "Spectrum"),
    "KappaTuneError": ("errors", "KappaTuneError"),
    "parse_size": ("policies", "parse_size"),
    "SelectConfig": ("policies", "SelectConfig"),
    "SelectedUnit": ("report", "SelectedUnit"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{mod}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kappatune' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
