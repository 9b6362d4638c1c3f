"""scan(source) -> KappaReport: every eligible unit's spectrum, one source tensor in memory at a time.

A content-keyed cache (hash of the unit's bytes + dtype + shape + options + kappatune version) makes a
second scan of unchanged weights nearly free, whatever the file is called.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from dataclasses import asdict

import torch

from . import __version__
from ._io import as_float, atomic_write_json
from .errors import KappaTuneError
from .report import KappaReport, UnitResult, structure_fingerprint
from .sources import Source, open_source
from .spectral import Spectrum, spectrum
from .units import UnitSpec, _prod, plan_units, unit_matrix

log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    return os.environ.get("KAPPATUNE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "kappatune", "spectra")


def content_hash(t: torch.Tensor) -> str:
    """Hash of a tensor's stored bytes, dtype and shape (no float conversion): XXH3, 128 bits. Every byte of
    every scanned tensor goes through it, and it is ~12x faster than SHA-256 here (22 vs 1.8 GB/s); it
    identifies weights (cache keys, fingerprints), it is not a defence against crafted collisions."""
    import xxhash

    t = t.detach().contiguous()
    h = xxhash.xxh3_128()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(memoryview(t.reshape(-1).view(torch.uint8).cpu().numpy()))
    return h.hexdigest()


def _raw(spec: UnitSpec, tensor: torch.Tensor) -> torch.Tensor:
    # The bytes that identify the unit's content, in the same layout on disk and in memory.
    if spec.source_slice is not None:
        x, r0, r1 = spec.source_slice
        return tensor[x, r0:r1]
    return tensor


class _Cache:
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
        except OSError as e:  # a read-only cache must not fail the scan
            log.debug("cache write failed: %s", e)


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
    compute_dev = _resolve_device(device)
    src: Source = open_source(source)
    options = {"embeddings": bool(embeddings), "include_routers": bool(include_routers),
               "input_var": float(input_var), "exact": bool(exact),
               "device": "torch:cpu" if compute_dev == "cpu" else (compute_dev or "cpu")}
    ents = {e.source: e for e in src.entries()}
    plan = plan_units(list(ents.values()), model_type=src.model_type, embeddings=embeddings,
                      include_routers=include_routers)
    if not plan.units:
        raise KappaTuneError(f"no eligible weight matrix found in {_describe(src)} "
                             f"({len(plan.skipped)} tensors, all excluded)")
    store = _Cache(cache_dir, cache, f"iv={input_var}|exact={exact}")
    by_source: dict[str, list[UnitSpec]] = {}
    for u in plan.units:
        by_source.setdefault(u.source, []).append(u)
    results: dict[str, UnitResult] = {}
    hits = 0
    bar = _progress(len(plan.units), progress)
    dtypes = {k: e.dtype for k, e in ents.items()}

    def cpu_spectra(specs: list[UnitSpec], tensor: torch.Tensor) -> list:
        return [_attempt(lambda sp=sp: spectrum(unit_matrix(sp, tensor), input_var=input_var, force_exact=exact))
                for sp in specs]

    def device_spectra(specs: list[UnitSpec], tensor: torch.Tensor) -> list:
        from .spectral import spectra_torch

        try:
            return spectra_torch([unit_matrix(sp, tensor) for sp in specs], device=compute_dev,
                                 input_var=input_var, exact=exact)
        except Exception as e:  # noqa: BLE001 - e.g. out of device memory, a missing solver
            log.warning("device route on %s failed (%s); computing %d units on the CPU", compute_dev, e,
                        len(specs))
            return cpu_spectra(specs, tensor)

    compute = cpu_spectra if compute_dev is None else device_spectra

    def units_of(key: str, specs: list[UnitSpec], tensor: torch.Tensor) -> tuple[list[UnitResult], int]:
        return _scan_units(specs, tensor, store, dtypes.get(key, "?"), compute)

    def failed(key: str, specs: list[UnitSpec], e: Exception) -> tuple[list[UnitResult], int]:
        return [_result(sp, dtypes.get(key, "?"), None, "", "error", str(e)) for sp in specs], 0

    def work(key: str) -> tuple[list[UnitResult], int]:
        try:
            tensor = src.load(key)
        except KappaTuneError as e:
            return failed(key, by_source[key], e)
        return units_of(key, by_source[key], tensor)

    src_bytes = {k: _prod(ents[k].shape) * _itemsize(ents[k].dtype) for k in by_source if k in ents}
    rank, world, own_group = _distributed() if distributed else (0, 1, False)
    my_keys = _shard(list(by_source), {k: _task_bytes(by_source[k], src_bytes.get(k, 0)) for k in by_source},
                     rank, world) if world > 1 else list(by_source)
    n_workers = _workers(workers, max(sum(len(by_source[k]) for k in my_keys), 1))
    old_threads = torch.get_num_threads()
    malloc_tuned = src.kind != "module" and _mmap_threshold(1 << 20)
    # every BLAS (torch's, numpy/scipy's OpenBLAS) single-threaded: workers are the parallelism, and the
    # small level-2 calls of Lanczos are many times slower with threads
    limiter = _blas_single_thread()
    try:
        if n_workers == 1 or compute_dev is not None:  # a device route batches within a tensor
            for key in my_keys:
                res, n_hit = work(key)
                hits += n_hit
                for r in res:
                    results[r.name] = r
                bar.update(len(res))
        else:
            # Threads with one BLAS thread each: the LAPACK/BLAS calls release the GIL, and two single-thread
            # streams beat one two-thread stream on these mid-sized matrices. A task is one unit, or all the
            # units of a source tensor that holds one; a tensor is loaded once, by the first of its tasks to
            # run, shared by the others and dropped after its last, so a fused MoE tensor (64 experts) keeps
            # every worker busy. Tensors and work arrays in flight are held to the memory budget; one worker
            # reads while the other computes.
            from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

            torch.set_num_threads(1)
            budget = memory_budget if memory_budget is not None else default_memory_budget(
                max((_prod(ents[k].shape) for k in my_keys if k in ents), default=0))
            tasks = [(k, [sp]) for k in my_keys for sp in by_source[k]]
            held = {k: _Held(len(by_source[k])) for k in my_keys}

            def run(key: str, specs: list[UnitSpec]) -> tuple[list[UnitResult], int]:
                h = held[key]
                try:
                    with h.lock:  # the first task loads; the others of this tensor wait for it
                        if not h.loaded:
                            h.loaded = True
                            try:
                                h.tensor = src.load(key)
                            except KappaTuneError as e:
                                h.error = e
                    if h.error is not None:
                        return failed(key, specs, h.error)
                    return units_of(key, specs, h.tensor)
                finally:
                    with h.lock:
                        h.left -= 1
                        if h.left == 0:
                            h.tensor = None  # the last task of this tensor releases it

            with ThreadPoolExecutor(max_workers=n_workers) as pool:
                pending: dict = {}  # future -> (key, work bytes)
                inflight_src: set[str] = set()  # source tensors held: a task of theirs has started, not all ended
                i = 0

                def in_flight() -> int:
                    return sum(src_bytes.get(k, 0) for k in inflight_src) + sum(w for _, w in pending.values())

                while True:
                    # Start tasks while a worker is free and the estimated bytes in flight fit the budget
                    # (at least one task always runs): big tensors are then scanned one at a time.
                    while i < len(tasks) and len(pending) < n_workers:
                        key, specs = tasks[i]
                        extra = _work_bytes(specs) + (0 if key in inflight_src else src_bytes.get(key, 0))
                        if pending and in_flight() + extra > budget:
                            break
                        pending[pool.submit(run, key, specs)] = (key, _work_bytes(specs))
                        inflight_src.add(key)
                        i += 1
                    if not pending:
                        break
                    done, _ = wait(set(pending), return_when=FIRST_COMPLETED)
                    for f in done:
                        key, _ = pending.pop(f)
                        if held[key].left == 0:  # its last task has ended: the tensor is released
                            inflight_src.discard(key)
                        res, n_hit = f.result()
                        hits += n_hit
                        for r in res:
                            results[r.name] = r
                        bar.update(len(res))
    finally:
        torch.set_num_threads(old_threads)
        if limiter is not None:
            limiter.restore_original_limits()
        if malloc_tuned:
            _mmap_threshold(32 << 20)
        bar.close()
        src.close()
    if world > 1:  # every rank gets every result; the report is the same on all ranks
        import torch.distributed as dist

        gathered: list = [None] * world
        dist.all_gather_object(gathered, ([_to_dict(r) for r in results.values()], hits))
        results, hits = {}, 0
        for part, h in gathered:
            hits += h
            for d in part:
                r = UnitResult.from_dict(d)
                results[r.name] = r
        if own_group:
            dist.destroy_process_group()
    units = [results[u.name] for u in plan.units]
    units.sort(key=lambda u: u.name)
    skipped = [{"name": s.name, "shape": list(s.shape), "reason": s.reason} for s in plan.skipped]
    fp = structure_fingerprint((u.name, u.shape) for u in units)
    ch = hashlib.sha256("".join(u.content_hash for u in units).encode()).hexdigest()[:16]
    return KappaReport(units=units, skipped=skipped, source=src.describe(), options=options,
                       structure_fingerprint=fp, content_fingerprint=ch, elapsed_s=time.perf_counter() - t0,
                       cache_hits=hits)


def _resolve_device(device: str | None) -> str | None:
    """The torch device of the batched route, or None for the CPU routes."""
    if device in (None, "auto"):
        if not torch.cuda.is_available():
            return None
        local = os.environ.get("LOCAL_RANK")
        return f"cuda:{int(local)}" if local is not None and torch.cuda.device_count() > 1 else "cuda"
    if device == "cpu":
        return None
    if device == "torch:cpu":
        return "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise KappaTuneError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KappaTuneError(f"device {device!r} requested but torch sees no CUDA device")
    return str(dev)


def _attempt(fn):
    """fn()'s result, or the exception it raised (one bad unit never aborts a scan)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported per unit
        return e


def _scan_units(specs: list[UnitSpec], tensor: torch.Tensor, store, dtype_name: str,
                compute) -> tuple[list[UnitResult], int]:
    """One source tensor's units: content hashes, cache hits, ``compute(specs, tensor)`` (one Spectrum or
    exception per unit) for the others, results in ``specs`` order; (results, cache hits)."""
    dtype = str(tensor.dtype).replace("torch.", "")
    hashes: dict[str, str] = {}
    got: dict[str, Spectrum | Exception] = {}
    todo: list[UnitSpec] = []
    for spec in specs:
        h = _attempt(lambda: content_hash(_raw(spec, tensor)))
        if isinstance(h, Exception):
            got[spec.name] = h
            continue
        hashes[spec.name] = h
        s = store.get(h)
        if s is None:
            todo.append(spec)
        else:
            got[spec.name] = s
    n_hit = len(specs) - len(todo) - sum(isinstance(v, Exception) for v in got.values())
    for spec, s in zip(todo, compute(todo, tensor) if todo else []):
        if isinstance(s, Spectrum):
            store.put(hashes[spec.name], s)
        got[spec.name] = s
    out = []
    for spec in specs:
        s = got[spec.name]
        if isinstance(s, Exception):
            log.warning("%s: %s", spec.name, s)
            out.append(_result(spec, dtype_name, None, "", "error", str(s)))
            continue
        if s.status == "nonfinite":
            log.warning("%s: weights contain NaN or Inf; kappa is undefined (status 'nonfinite')", spec.name)
        out.append(_result(spec, dtype, s, hashes[spec.name], s.status))
    return out, n_hit


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether we created the process group). Joins torchrun/accelerate launches: an
    initialised torch.distributed group, or WORLD_SIZE > 1 in the environment (gloo on CPU, NCCL on CUDA)."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _shard(keys: list[str], cost: dict[str, int], rank: int, world: int) -> list[str]:
    """This rank's share of the source tensors: greedy balance of the estimated work (largest first),
    deterministic so that every rank computes the same partition."""
    loads = [0] * world
    owner: dict[str, int] = {}
    for k in sorted(keys, key=lambda k: (-cost[k], k)):
        r = loads.index(min(loads))
        owner[k] = r
        loads[r] += cost[k]
    return [k for k in keys if owner[k] == rank]


def _to_dict(r: UnitResult) -> dict:
    d = asdict(r)
    d["shape"] = list(r.shape)
    return d


def _itemsize(dtype: str) -> int:
    try:
        return torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    except (AttributeError, TypeError):
        return 4


def default_memory_budget(largest_numel: int) -> int:
    """Default bytes in flight: 2x the largest tensor in float32 (a task holds the tensor, its float64 Gram
    and an upcast block, so two big tasks do not run together), with a 64 MB floor so small models keep
    every worker busy."""
    return max(2 * 4 * int(largest_numel), 64 << 20)


def _work_bytes(specs: list[UnitSpec]) -> int:
    """Rough peak bytes of the float64 work arrays of scanning these units one after the other: the p x p
    Gram (or a square matrix's own copy, factored in place), a second p x p array on the QR route, one
    upcast column block."""
    return max((16 * min(s.shape) ** 2 + 8 * min(s.numel, 1 << 21) for s in specs), default=0)


def _task_bytes(specs: list[UnitSpec], source_bytes: int) -> int:
    """Rough peak bytes of scanning one source tensor's units one after the other: the tensor and the work."""
    return source_bytes + _work_bytes(specs)


class _Held:
    """A source tensor shared by the tasks of its units: loaded by the first to run, dropped after the last."""

    def __init__(self, n_tasks: int) -> None:
        self.lock = threading.Lock()
        self.loaded = False
        self.tensor = None
        self.error: Exception | None = None
        self.left = n_tasks


def _workers(requested: int | None, n_tasks: int) -> int:
    if requested is not None and requested < 1:
        raise KappaTuneError(f"workers must be >= 1, got {requested}")
    n = requested or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    return max(1, min(n, n_tasks))


def model_structure_fingerprint(model: torch.nn.Module, options: dict) -> tuple[str, dict[str, UnitSpec]]:
    """The structure fingerprint a scan of ``model`` with ``options`` would have, without any SVD."""
    src = open_source(model)
    plan = plan_units(src.entries(), model_type=src.model_type, embeddings=bool(options.get("embeddings")),
                      include_routers=bool(options.get("include_routers")))
    return structure_fingerprint((u.name, u.shape) for u in plan.units), {u.name: u for u in plan.units}


def _result(spec: UnitSpec, dtype: str, s: Spectrum | None, chash: str, status: str,
            message: str | None = None) -> UnitResult:
    nan = math.nan
    vals = (s.sigma_max, s.sigma_min, s.kappa, s.log_volume, s.entropy, s.entropy_max, s.entropy_deficit) \
        if s is not None else (nan,) * 7
    return UnitResult(name=spec.name, param=spec.param, source=spec.source, layout=spec.layout, kind=spec.kind,
                      group=spec.group, layer=spec.layer, shape=spec.shape, numel=spec.numel, dtype=dtype,
                      sigma_max=vals[0], sigma_min=vals[1], kappa=vals[2], log_volume=vals[3], entropy=vals[4],
                      entropy_max=vals[5], entropy_deficit=vals[6], status=status,
                      method=s.method if s is not None else "none", content_hash=chash, expert=spec.expert,
                      half=spec.half, param_rows=spec.param_rows, message=message or "")


def _describe(src: Source) -> str:
    d = src.describe()
    return d.get("path") or d.get("class") or d.get("kind", "source")


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="kappa scan", unit="unit", leave=False)


def _blas_single_thread():
    """Limit every loaded BLAS (torch's, scipy's OpenBLAS) to one thread while scan threads run."""
    from .spectral import _cblas, _scipy_lapack

    _scipy_lapack()  # load scipy's BLAS first: threadpoolctl only limits libraries already loaded
    _cblas()  # and find the CBLAS routines once, before scan threads start
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency
        return None
    return threadpool_limits(limits=1, user_api="blas")


def _mmap_threshold(nbytes: int) -> bool:
    """glibc: serve allocations >= nbytes by mmap, so a freed tensor or Gram goes back to the system at once
    instead of staying in a thread's malloc arena (scan threads otherwise each keep their own freed blocks:
    ~+15% peak RSS from disk). Set to 1 MB during a scan from disk and to 32 MB (the value glibc's dynamic
    threshold grows to) afterwards. False where mallopt is unavailable."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
