"""scan(source) -> KappaReport: every eligible unit's spectrum, one source tensor in memory at a time.

A scan is plan -> execute -> assemble:

* plan: which units the source holds (``units.plan_units``), grouped by the source tensor they are read from;
* execute: this rank's share of the tensors (``scan_distributed``), each unit's content hash, a cache lookup,
  and the chosen route's spectra for the misses (``scan_routes``), run serially or on budgeted worker
  threads (``scan_executor``);
* assemble: every rank's results into one ``KappaReport``.

A content-keyed cache (hash of the unit's bytes + dtype + shape + options + route + kappatune version) makes a
second scan of unchanged weights nearly free, whatever the file is called.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass

import torch

from . import scan_distributed
from .errors import KappaTuneError
from .hashing import tensor_hash
from .report import KappaReport, UnitResult
from .scan_cache import SpectrumCache
from .scan_executor import default_memory_budget, execute, work_bytes
from .scan_routes import CpuRoute, DeviceRoute, attempt, choose_route
from .sources import Source, open_source
from .spectral import Spectrum
from .units import Entry, Skipped, UnitSpec, plan_units, raw_unit, structure_fingerprint

log = logging.getLogger(__name__)


def scan(source, *, embeddings: bool = False, include_routers: bool = False, cache: bool = True,
         cache_dir: str | None = None, progress: bool = False, input_var: float = 1.0,
         exact: bool = False, workers: int | None = None, memory_budget: int | None = None,
         distributed: bool = True, device: str | None = None) -> KappaReport:
    """Spectra of every eligible unit of ``source`` (an ``nn.Module`` or a path).

    Args:
        source: ``nn.Module``, a model folder (sharded safetensors too), a ``.safetensors`` or ``.gguf`` file.
        embeddings: also scan embeddings and LM heads.
        include_routers: also scan MoE routers (excluded by default, as in the paper).
        cache: reuse spectra of unchanged weights (content-keyed) and store new ones.
        progress: show a progress bar on stderr.
        input_var: input variance sigma_x^2 of the Gaussian-entropy figures (eq. 6).
        exact: skip the Gram route and use float64 svdvals for every unit.
        workers: parallel single-BLAS-thread workers (default: the number of CPU cores, at most 8).
        memory_budget: bytes of tensors and float64 work arrays allowed in flight across workers (default:
            twice the largest source tensor's size in float32, at least 64 MB: the measured peak then stays
            within ~3x that tensor above the baseline); larger tensors are then scanned one at a time.
        distributed: under torchrun / accelerate launch (or an initialised process group), split the work
            across ranks; False scans everything in this process (what training does before DDP starts).
        device: where the spectra are computed. None / "auto": a CUDA device when one is available (the
            rank's own under torchrun), else the CPU routes; "cpu": the CPU routes; any other torch device
            ("cuda", "cuda:1"): the batched float64 torch route on it (``spectral.spectra_torch``);
            "torch:cpu" runs that route on the CPU (for comparison and tests). If the device route fails,
            the affected units are computed on the CPU routes (with a warning).
    """
    if input_var <= 0:
        raise KappaTuneError(f"input_var must be > 0, got {input_var}")
    t0 = time.perf_counter()
    route = choose_route(device, input_var=input_var, exact=exact)
    options = {"embeddings": bool(embeddings), "include_routers": bool(include_routers),
               "input_var": float(input_var), "exact": bool(exact), "device": route.label}
    src: Source = open_source(source)
    try:
        plan = ScanPlan.of(src, embeddings=embeddings, include_routers=include_routers)
        store = SpectrumCache(cache_dir, cache, f"iv={input_var}|exact={exact}|route={route.key}")
        results, hits = _execute(src, plan, _UnitJob(src, store, route, plan.entries), distributed=distributed,
                                 workers=workers, memory_budget=memory_budget, progress=progress)
    finally:
        src.close()
    return _assemble(plan, results, hits, src.describe(), options, t0)


# ---- plan ------------------------------------------------------------------------------------------------

@dataclass
class ScanPlan:
    """The units a scan computes, grouped by the source tensor they are read from, and what it skips."""

    units: list[UnitSpec]
    skipped: list[Skipped]
    entries: dict[str, Entry]            # source key -> its tensor's entry
    by_source: dict[str, list[UnitSpec]]  # source key -> its units, in plan order

    @classmethod
    def of(cls, src: Source, *, embeddings: bool, include_routers: bool) -> "ScanPlan":
        entries = {e.source: e for e in src.entries()}
        plan = plan_units(list(entries.values()), model_type=src.model_type, embeddings=embeddings,
                          include_routers=include_routers)
        if not plan.units:
            raise KappaTuneError(f"no eligible weight matrix found in {_describe(src)} "
                                 f"({len(plan.skipped)} tensors, all excluded)")
        by_source: dict[str, list[UnitSpec]] = {}
        for u in plan.units:
            by_source.setdefault(u.source, []).append(u)
        by_source = {k: by_source[k] for k in src.load_order(list(by_source))}  # tensors are loaded in this order
        return cls(plan.units, plan.skipped, entries, by_source)

    def source_bytes(self) -> dict[str, int]:
        """Stored bytes of each source tensor that holds units."""
        return {k: math.prod(self.entries[k].shape) * _itemsize(self.entries[k].dtype) for k in self.by_source}

    def largest_numel(self, keys: list[str]) -> int:
        return max((math.prod(self.entries[k].shape) for k in keys), default=0)


def _itemsize(dtype: str) -> int:
    try:
        return torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    except (AttributeError, TypeError):
        return 4


def _describe(src: Source) -> str:
    d = src.describe()
    return d.get("path") or d.get("class") or d.get("kind", "source")


# ---- execute ---------------------------------------------------------------------------------------------

def _execute(src: Source, plan: ScanPlan, job: "_UnitJob", *, distributed: bool, workers: int | None,
             memory_budget: int | None, progress: bool) -> tuple[dict[str, UnitResult], int]:
    """This rank's share of the plan through ``job``, then every rank's results: ({name: result}, hits)."""
    ranks = scan_distributed.join(distributed)
    try:
        src_bytes = plan.source_bytes()
        cost = {k: src_bytes[k] + work_bytes(specs) for k, specs in plan.by_source.items()}
        keys = scan_distributed.shard(list(plan.by_source), cost, ranks)
        budget = memory_budget if memory_budget is not None else default_memory_budget(plan.largest_numel(keys))
        results, hits = execute(job, {k: plan.by_source[k] for k in keys}, workers=workers, budget=budget,
                                source_bytes=src_bytes, per_unit=not job.route.batched,
                                from_disk=src.kind != "module", progress=progress)
        return scan_distributed.gather(results, hits, ranks)
    finally:
        scan_distributed.leave(ranks)


class _UnitJob:
    """A source tensor's units -> report units: content hash, cache lookup, the route's spectra for the
    misses (stored in the cache). One bad unit is reported as status "error", never aborts the scan."""

    def __init__(self, src: Source, store: SpectrumCache, route: CpuRoute | DeviceRoute,
                 entries: dict[str, Entry]) -> None:
        self.src, self.store, self.route, self.entries = src, store, route, entries

    def load(self, key: str) -> torch.Tensor:
        return self.src.load(key)

    def failed(self, key: str, specs: list[UnitSpec], error: Exception) -> tuple[list[UnitResult], int]:
        return [UnitResult.build(sp, self._stored_dtype(key), None, message=str(error)) for sp in specs], 0

    def units(self, key: str, specs: list[UnitSpec], tensor: torch.Tensor) -> tuple[list[UnitResult], int]:
        """Results in ``specs`` order, and how many came from the cache."""
        hashes = {sp.name: attempt(tensor_hash, raw_unit(sp, tensor)) for sp in specs}
        got: dict[str, Spectrum | Exception] = {n: h for n, h in hashes.items() if isinstance(h, Exception)}
        todo = []
        for sp in specs:
            if sp.name not in got:
                s = self.store.get(hashes[sp.name])
                if s is None:
                    todo.append(sp)
                else:
                    got[sp.name] = s
        n_hit = len(specs) - len(todo) - sum(isinstance(h, Exception) for h in hashes.values())
        for sp, s in zip(todo, self.route.spectra(todo, tensor) if todo else []):
            if isinstance(s, Spectrum):
                self.store.put(hashes[sp.name], s)
            got[sp.name] = s
        dtype = str(tensor.dtype).replace("torch.", "")
        return [self._result(key, sp, got[sp.name], hashes[sp.name], dtype) for sp in specs], n_hit

    def _result(self, key: str, spec: UnitSpec, s: Spectrum | Exception, chash, dtype: str) -> UnitResult:
        if isinstance(s, Exception):
            log.warning("%s: %s", spec.name, s)
            return UnitResult.build(spec, self._stored_dtype(key), None, message=str(s))
        if s.status == "nonfinite":
            log.warning("%s: weights contain NaN or Inf; kappa is undefined (status 'nonfinite')", spec.name)
        return UnitResult.build(spec, dtype, s, chash)

    def _stored_dtype(self, key: str) -> str:
        e = self.entries.get(key)
        return e.dtype if e is not None else "?"


# ---- assemble --------------------------------------------------------------------------------------------

def _assemble(plan: ScanPlan, results: dict[str, UnitResult], hits: int, source: dict, options: dict,
              t0: float) -> KappaReport:
    units = sorted((results[u.name] for u in plan.units), key=lambda u: u.name)
    skipped = [{"name": s.name, "shape": list(s.shape), "reason": s.reason} for s in plan.skipped]
    fp = structure_fingerprint((u.name, u.shape) for u in units)
    ch = hashlib.sha256("".join(u.content_hash for u in units).encode()).hexdigest()[:16]
    return KappaReport(units=units, skipped=skipped, source=source, options=options, structure_fingerprint=fp,
                       content_fingerprint=ch, elapsed_s=time.perf_counter() - t0, cache_hits=hits)
