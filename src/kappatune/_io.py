"""Atomic file writes: a killed run never leaves a half-written output."""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any


def atomic_write_text(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _encode(o: Any) -> Any:
    # JSON has no inf/nan: write them as strings and read them back as floats.
    if isinstance(o, float) and not math.isfinite(o):
        return "nan" if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, dict):
        return {k: _encode(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_encode(v) for v in o]
    return o


def dumps(obj: Any) -> str:
    return json.dumps(_encode(obj), indent=1, allow_nan=False) + "\n"


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, dumps(obj))


def as_float(v: Any) -> float:
    """A JSON value back as a float: numbers, and the strings "inf", "-inf", "nan" that ``dumps`` writes."""
    return float(v)
