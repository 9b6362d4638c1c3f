"""KappaReport and Selection: what a scan found and what a policy chose; JSON/CSV I/O; exports.

All writes are atomic. Non-finite floats are stored as the strings "inf", "-inf", "nan".
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from . import __version__
from ._io import as_float, atomic_write_json, atomic_write_text, dumps
from .errors import KappaTuneError
from .units import structure_fingerprint  # noqa: F401 - defined with the unit naming; kept importable here

#: The figures a report unit takes from its ``spectral.Spectrum`` (every Spectrum field but frobenius_sq, status
#: and method): the one field list a UnitResult is built (``UnitResult.build``) and read back (``from_dict``) by.
_FLOAT_FIELDS = ("sigma_max", "sigma_min", "kappa", "log_volume", "entropy", "entropy_max", "entropy_deficit")
#: The fields a report unit takes from its ``units.UnitSpec``.
_SPEC_FIELDS = ("name", "param", "source", "layout", "kind", "group", "layer", "shape", "numel", "expert", "half",
                "param_rows")


@dataclass
class UnitResult:
    """One unit's figures. ``name`` is the in-memory name; ``source`` the tensor key it was read from."""

    name: str
    param: str
    source: str
    layout: str
    kind: str
    group: str
    layer: int | None
    shape: tuple[int, int]
    numel: int
    dtype: str
    sigma_max: float
    sigma_min: float
    kappa: float
    log_volume: float
    entropy: float
    entropy_max: float
    entropy_deficit: float
    status: str            # ok | singular | nonfinite | error
    method: str            # lu-lanczos | gram-lanczos | gram-eigh | qr-lanczos | svd | none
    content_hash: str = ""
    expert: int | None = None
    half: str | None = None
    param_rows: tuple[int, int] | None = None
    message: str = ""

    @property
    def is_slice(self) -> bool:
        return self.expert is not None

    @classmethod
    def build(cls, spec, dtype: str, spectrum=None, content_hash: str = "", message: str = "") -> "UnitResult":
        """A report unit from its ``UnitSpec`` and ``Spectrum``; ``spectrum=None``: the unit failed (status
        "error", NaN figures, ``message`` says why)."""
        kw = {k: getattr(spec, k) for k in _SPEC_FIELDS}
        if spectrum is None:
            kw.update(dict.fromkeys(_FLOAT_FIELDS, float("nan")), status="error", method="none")
        else:
            kw.update({k: getattr(spectrum, k) for k in _FLOAT_FIELDS}, status=spectrum.status,
                      method=spectrum.method)
        return cls(dtype=dtype, content_hash=content_hash, message=message, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UnitResult":
        kw = {f.name: d.get(f.name) for f in fields(cls) if f.name in d}
        for k in _FLOAT_FIELDS:
            kw[k] = as_float(kw[k])
        kw["shape"] = tuple(kw["shape"])
        if kw.get("param_rows") is not None:
            kw["param_rows"] = tuple(kw["param_rows"])
        return cls(**kw)


@dataclass
class KappaReport:
    units: list[UnitResult]
    skipped: list[dict]
    source: dict
    options: dict
    structure_fingerprint: str
    content_fingerprint: str
    elapsed_s: float = 0.0
    cache_hits: int = 0
    kappatune_version: str = __version__

    # ---- access ---------------------------------------------------------------------------------
    def by_name(self) -> dict[str, UnitResult]:
        return {u.name: u for u in self.units}

    def __len__(self) -> int:
        return len(self.units)

    def name_map(self) -> dict[str, str]:
        """Unit name (in-memory naming) -> tensor key in the scanned source, where they differ."""
        return {u.name: u.source for u in self.units if u.source != u.name}

    def kind_medians(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        kinds: dict[str, list[float]] = {}
        for u in self.units:
            if u.status == "ok":
                kinds.setdefault(u.kind, []).append(u.kappa)
        for k, v in sorted(kinds.items(), key=lambda kv: statistics.median(kv[1])):
            out[k] = {"count": len(v), "median_kappa": statistics.median(v), "min_kappa": min(v),
                      "max_kappa": max(v)}
        return out

    # ---- I/O ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"] = "kappatune.report/1"
        return d

    def save(self, path: str) -> None:
        atomic_write_json(path, self.to_dict())

    def to_csv(self) -> str:
        buf = io.StringIO()
        cols = ["name", "source", "kind", "group", "layer", "rows", "cols", "numel", "dtype", *_FLOAT_FIELDS,
                "status", "method", "expert", "half"]
        w = csv.writer(buf)
        w.writerow(cols)
        for u in self.units:
            w.writerow([u.name, u.source, u.kind, u.group, u.layer, u.shape[0], u.shape[1], u.numel, u.dtype,
                        *[repr(getattr(u, k)) for k in _FLOAT_FIELDS], u.status, u.method, u.expert, u.half])
        return buf.getvalue()

    def save_csv(self, path: str) -> None:
        atomic_write_text(path, self.to_csv())

    @classmethod
    def from_dict(cls, d: dict) -> "KappaReport":
        if d.get("format") != "kappatune.report/1":
            raise KappaTuneError("not a kappatune report (missing format 'kappatune.report/1')")
        return cls(units=[UnitResult.from_dict(u) for u in d["units"]], skipped=d.get("skipped", []),
                   source=d.get("source", {}), options=d.get("options", {}),
                   structure_fingerprint=d["structure_fingerprint"], content_fingerprint=d["content_fingerprint"],
                   elapsed_s=float(d.get("elapsed_s", 0.0)), cache_hits=int(d.get("cache_hits", 0)),
                   kappatune_version=d.get("kappatune_version", "?"))

    @classmethod
    def load(cls, path: str) -> "KappaReport":
        return cls.from_dict(_load_json(path, "report"))


def _load_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise KappaTuneError(f"{path}: no such {what} file") from None
    except (OSError, ValueError) as e:
        raise KappaTuneError(f"{path}: not a readable JSON {what} ({' '.join(str(e).split())})") from None
    if not isinstance(d, dict):
        raise KappaTuneError(f"{path}: not a kappatune {what}")
    return d


@dataclass
class SelectedUnit:
    """One chosen unit: what ``apply`` and the exports need (the figures stay in the report).

    ``param`` is the parameter the unit lives in; for a slice of a fused MoE parameter ``expert`` is its
    expert index, ``half`` 'gate' / 'up' (or None) and ``param_rows`` its rows [r0, r1) within one expert.
    """

    name: str
    param: str
    kind: str
    group: str
    layer: int | None
    layout: str
    kappa: float
    numel: int
    shape: tuple[int, int]
    expert: int | None = None
    half: str | None = None
    param_rows: tuple[int, int] | None = None

    @property
    def is_slice(self) -> bool:
        return self.expert is not None

    @property
    def module(self) -> str | None:
        """The module that holds this unit's weight (PEFT ``target_modules`` entry), or None for a bare
        parameter (fused experts, any tensor that is not a module's ``.weight``)."""
        if self.layout in _MODULE_LAYOUTS and self.param.endswith(".weight"):
            return self.param[: -len(".weight")]
        return None

    @classmethod
    def from_unit(cls, u: UnitResult) -> "SelectedUnit":
        return cls(name=u.name, param=u.param, kind=u.kind, group=u.group, layer=u.layer, layout=u.layout,
                   kappa=u.kappa, numel=u.numel, shape=tuple(u.shape), expert=u.expert, half=u.half,
                   param_rows=tuple(u.param_rows) if u.param_rows else None)

    @classmethod
    def from_dict(cls, d: dict) -> "SelectedUnit":
        try:
            return cls(name=d["name"], param=d["param"], kind=d["kind"], group=d.get("group", "other"),
                       layer=d.get("layer"), layout=d.get("layout", ""), kappa=as_float(d["kappa"]),
                       numel=int(d["numel"]), shape=tuple(d["shape"]), expert=d.get("expert"),
                       half=d.get("half"),
                       param_rows=tuple(d["param_rows"]) if d.get("param_rows") is not None else None)
        except (KeyError, TypeError, ValueError) as e:
            raise KappaTuneError(f"selection unit {d.get('name', d)!r} is incomplete or malformed ({e!r})") from None


_MODULE_LAYOUTS = ("linear", "conv1d_hf", "conv", "embedding")


@dataclass
class Selection:
    """Units chosen by a policy, in selection order (lowest kappa first for the default policy)."""

    units: list[SelectedUnit]
    policy: dict
    structure_fingerprint: str
    content_fingerprint: str
    scan_options: dict
    total_params: int = 0
    count: int = 0
    kappatune_version: str = __version__
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]

    @property
    def has_slices(self) -> bool:
        return any(u.is_slice for u in self.units)

    def to_dict(self) -> dict:
        d = asdict(self)  # SelectedUnit -> dict with the field order of format kappatune.selection/1
        d["format"] = "kappatune.selection/1"
        return d

    def save(self, path: str) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "Selection":
        if d.get("format") != "kappatune.selection/1":
            raise KappaTuneError("not a kappatune selection (missing format 'kappatune.selection/1')")
        units = [SelectedUnit.from_dict(u) for u in d["units"]]
        return cls(units=units, policy=d["policy"], structure_fingerprint=d["structure_fingerprint"],
                   content_fingerprint=d.get("content_fingerprint", ""), scan_options=d.get("scan_options", {}),
                   total_params=int(d.get("total_params", 0)), count=int(d.get("count", len(units))),
                   kappatune_version=d.get("kappatune_version", "?"), notes=list(d.get("notes", [])))

    @classmethod
    def load(cls, path: str) -> "Selection":
        return cls.from_dict(_load_json(path, "selection"))

    # ---- exports --------------------------------------------------------------------------------
    def _refuse_slices(self, tool: str) -> None:
        sl = [u.name for u in self.units if u.is_slice]
        if sl:
            raise KappaTuneError(
                f"{tool} cannot act on one expert inside a fused parameter ({len(sl)} selected slice units, e.g. "
                f"{sl[0]}); it would widen the choice to every expert. Exclude experts (--exclude '.*@.*') "
                f"or train slices with kappatune itself")

    def to_peft_kwargs(self) -> dict:
        """``LoraConfig`` keyword arguments naming exactly the selected modules, in selection order."""
        self._refuse_slices("PEFT")
        mods, params = [], []
        for u in self.units:
            if u.module is not None:
                mods.append(u.module)
            else:
                params.append(u.param)
        out: dict[str, Any] = {"target_modules": mods}
        if params:
            out["target_parameters"] = params
        return out

    def to_axolotl_yaml(self) -> str:
        """Axolotl ``unfrozen_parameters``: one anchored regex per selected parameter."""
        import yaml

        self._refuse_slices("Axolotl")
        pats = ["^" + re.escape(u.param) + "$" for u in self.units]
        return yaml.safe_dump({"unfrozen_parameters": pats}, sort_keys=False, width=10_000)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["rank", "name", "param", "kind", "layer", "kappa", "numel"])
        for i, u in enumerate(self.units):
            w.writerow([i + 1, u.name, u.param, u.kind, u.layer, repr(u.kappa), u.numel])
        return buf.getvalue()


def dumps_json(obj: Any) -> str:
    return dumps(obj)
