"""Training methods, one module each, registered by name (``METHODS``); see ``base`` for the contract.

To add a method: a new module here that builds its ``Prepared`` and calls ``register(Method(...))``, plus
its import line below and a test (docs/contributing.md).
"""

from .base import METHODS, Method, MethodContext, Prepared, get_method, method_options, options_help, register

from . import full, lora, selective  # noqa: E402,F401  (importing a method module registers it)
from . import corda_kpm, dora, mica, osf, pissa  # noqa: E402,F401  (PEFT's forgetting-aware adapters)

__all__ = ["METHODS", "Method", "MethodContext", "Prepared", "get_method", "method_options", "options_help", "register"]
