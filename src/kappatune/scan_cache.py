"""The spectrum cache: one JSON file per (kappatune version, scan options, route, unit content hash), so a
second scan of unchanged weights is nearly free, whatever the file is called."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict

from . import __version__
from ._io import as_float, atomic_write_json
from .spectral import Spectrum

log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    """``$KAPPATUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/kappatune/spectra`` (``~/.cache`` by default)."""
    return os.environ.get("KAPPATUNE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "kappatune", "spectra")


class SpectrumCache:
    """Spectra keyed by content hash under ``options_key`` (the options and route that shape a spectrum).
    Disabled, it stores nothing and finds nothing; unreadable entries are misses; write failures are ignored
    (a read-only cache must not fail a scan)."""

    def __init__(self, directory: str | None, enabled: bool, options_key: str):
        self.dir = directory or default_cache_dir()
        self.enabled = enabled
        self.options_key = options_key

    def _path(self, chash: str) -> str:
        k = hashlib.sha256(f"{__version__}|{self.options_key}|{chash}".encode()).hexdigest()
        return os.path.join(self.dir, k[:2], k + ".json")

    def get(self, chash: str) -> Spectrum | None:
        if not self.enabled:
            return None
        try:
            with open(self._path(chash), encoding="utf-8") as f:
                d = json.load(f)
            return Spectrum(**{k: (as_float(v) if k not in ("status", "method") else v) for k, v in d.items()})
        except (OSError, ValueError, TypeError):
            return None

    def put(self, chash: str, s: Spectrum) -> None:
        if not self.enabled:
            return
        try:
            atomic_write_json(self._path(chash), asdict(s))
        except OSError as e:
            log.debug("cache write failed: %s", e)
