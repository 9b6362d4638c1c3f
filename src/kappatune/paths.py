"""Where kappatune keeps its caches: one rule for every cache folder.

``$<ENV>`` when set, else ``$XDG_CACHE_HOME/kappatune/<name>``, else ``~/.cache/kappatune/<name>``.
"""

from __future__ import annotations

import os


def cache_dir(name: str, env: str | None = None) -> str:
    """The cache folder ``name`` (e.g. 'spectra', 'models', 'speech-frames'); ``env`` names the variable that
    overrides it (e.g. 'KAPPATUNE_CACHE_DIR'). Not created here."""
    if env and os.environ.get(env):
        return os.environ[env]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "kappatune", name)
