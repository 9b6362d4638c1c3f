"""Running a scan's tasks: in this thread, or on worker threads with one BLAS thread each under a byte
budget; the process settings a scan runs under (BLAS threads, glibc's mmap threshold) and its progress bar.

Threads with one BLAS thread each: the LAPACK/BLAS calls release the GIL, and two single-thread streams beat
one two-thread stream on these mid-sized matrices. A task is one unit; a source tensor is loaded once, by the
first of its tasks to run, shared by the others and dropped after its last, so a fused MoE tensor (64
experts) keeps every worker busy. Tensors and work arrays in flight are held to the memory budget; one worker
reads while the other computes.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Protocol

import torch

from .errors import KappaTuneError
from .units import UnitSpec


class ScanJob(Protocol):
    """What the executor runs: load a source tensor, turn its units into results (with cache hits)."""

    def load(self, key: str) -> torch.Tensor: ...

    def units(self, key: str, specs: list[UnitSpec], tensor: torch.Tensor) -> tuple[list, int]: ...

    def failed(self, key: str, specs: list[UnitSpec], error: Exception) -> tuple[list, int]: ...


def execute(job: ScanJob, tasks: dict[str, list[UnitSpec]], *, workers: int | None, budget: int,
            source_bytes: dict[str, int], per_unit: bool, from_disk: bool, progress: bool) -> tuple[dict, int]:
    """Every unit of ``tasks`` (source key -> its units) through ``job``: ({unit name: result}, cache hits).

    ``per_unit``: units of one tensor may run on several worker threads (the CPU routes); otherwise each
    tensor's units are one call in this thread (a device route batches within a tensor). ``budget``: bytes
    of tensors and float64 work arrays allowed in flight across workers."""
    n_workers = resolve_workers(workers, max(sum(len(v) for v in tasks.values()), 1))
    tally = _Tally(sum(len(v) for v in tasks.values()), progress)
    pooled = n_workers > 1 and per_unit
    with _scan_settings(from_disk, pooled), contextlib.closing(tally):
        if not pooled:
            for key, specs in tasks.items():
                tally.add(*_run_tensor(job, key, specs))
        else:
            _BudgetedPool(job, tasks, n_workers, budget, source_bytes, tally).run()
    return tally.results, tally.hits


def _run_tensor(job: ScanJob, key: str, specs: list[UnitSpec]) -> tuple[list, int]:
    try:
        tensor = job.load(key)
    except KappaTuneError as e:
        return job.failed(key, specs, e)
    return job.units(key, specs, tensor)


# ---- sizing ----------------------------------------------------------------------------------------------

def resolve_workers(requested: int | None, n_tasks: int) -> int:
    """Worker threads: ``requested``, or the CPU cores available (at most 8); never more than the tasks."""
    if requested is not None and requested < 1:
        raise KappaTuneError(f"workers must be >= 1, got {requested}")
    n = requested or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    return max(1, min(n, n_tasks))


def default_memory_budget(largest_numel: int) -> int:
    """Default bytes in flight: 2x the largest tensor in float32 (a task holds the tensor, its float64 Gram
    and an upcast block, so two big tasks do not run together), with a 64 MB floor so small models keep
    every worker busy."""
    return max(2 * 4 * int(largest_numel), 64 << 20)


def work_bytes(specs: list[UnitSpec]) -> int:
    """Rough peak bytes of the float64 work arrays of scanning these units one after the other: the p x p
    Gram (or a square matrix's own copy, factored in place), a second p x p array on the QR route, one
    upcast column block."""
    return max((16 * min(s.shape) ** 2 + 8 * min(s.numel, 1 << 21) for s in specs), default=0)


# ---- the worker pool -------------------------------------------------------------------------------------

class _Held:
    """A source tensor shared by the tasks of its units: loaded by the first to run, dropped after the last."""

    def __init__(self, n_tasks: int) -> None:
        self.lock = threading.Lock()
        self.loaded = False
        self.tensor = None
        self.error: Exception | None = None
        self.left = n_tasks

    def acquire(self, load) -> None:
        with self.lock:  # the first task loads; the others of this tensor wait for it
            if not self.loaded:
                self.loaded = True
                try:
                    self.tensor = load()
                except KappaTuneError as e:
                    self.error = e

    def release(self) -> None:
        with self.lock:
            self.left -= 1
            if self.left == 0:
                self.tensor = None  # the last task of this tensor releases it


class _BudgetedPool:
    """One task per unit on ``n_workers`` threads, started while the estimated bytes in flight (source
    tensors held + running tasks' work arrays) fit the budget; at least one task always runs, so big tensors
    are then scanned one at a time."""

    def __init__(self, job: ScanJob, tasks: dict[str, list[UnitSpec]], n_workers: int, budget: int,
                 source_bytes: dict[str, int], tally: _Tally) -> None:
        self.job, self.n_workers, self.budget, self.src_bytes, self.tally = job, n_workers, budget, source_bytes, tally
        self.queue = [(k, [sp]) for k, specs in tasks.items() for sp in specs]
        self.held = {k: _Held(len(specs)) for k, specs in tasks.items()}
        self.pending: dict[Future, tuple[str, int]] = {}  # future -> (source key, work bytes)
        self.inflight_src: set[str] = set()  # source tensors held: a task of theirs has started, not all ended
        self.next = 0

    def run(self) -> None:
        with ThreadPoolExecutor(max_workers=self.n_workers) as pool:
            while True:
                self._start_tasks(pool)
                if not self.pending:
                    break
                done, _ = wait(set(self.pending), return_when=FIRST_COMPLETED)
                for f in done:
                    self._finish(f)

    def _in_flight(self) -> int:
        return sum(self.src_bytes.get(k, 0) for k in self.inflight_src) + sum(w for _, w in self.pending.values())

    def _start_tasks(self, pool: ThreadPoolExecutor) -> None:
        while self.next < len(self.queue) and len(self.pending) < self.n_workers:
            key, specs = self.queue[self.next]
            extra = work_bytes(specs) + (0 if key in self.inflight_src else self.src_bytes.get(key, 0))
            if self.pending and self._in_flight() + extra > self.budget:
                break
            self.pending[pool.submit(self._task, key, specs)] = (key, work_bytes(specs))
            self.inflight_src.add(key)
            self.next += 1

    def _finish(self, f: Future) -> None:
        key, _ = self.pending.pop(f)
        if self.held[key].left == 0:  # its last task has ended: the tensor is released
            self.inflight_src.discard(key)
        self.tally.add(*f.result())

    def _task(self, key: str, specs: list[UnitSpec]) -> tuple[list, int]:
        h = self.held[key]
        try:
            h.acquire(lambda: self.job.load(key))
            if h.error is not None:
                return self.job.failed(key, specs, h.error)
            return self.job.units(key, specs, h.tensor)
        finally:
            h.release()


# ---- results and progress --------------------------------------------------------------------------------

class _Tally:
    """Results by unit name, cache hits, and the progress bar (stderr) when asked for."""

    def __init__(self, total: int, progress: bool) -> None:
        self.results: dict = {}
        self.hits = 0
        self.bar = _progress_bar(total) if progress else None

    def add(self, results: list, hits: int) -> None:
        self.hits += hits
        for r in results:
            self.results[r.name] = r
        if self.bar is not None:
            self.bar.update(len(results))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress_bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="kappa scan", unit="unit", leave=False)


# ---- process settings during a scan ----------------------------------------------------------------------

@contextlib.contextmanager
def _scan_settings(from_disk: bool, pooled: bool):
    """Every BLAS (torch's, numpy/scipy's OpenBLAS) single-threaded while the scan runs: workers are the
    parallelism, and the small level-2 calls of Lanczos are many times slower with threads; torch's own
    intra-op threads too when worker threads run. From disk, glibc's mmap threshold lowered to 1 MB (see
    ``_mmap_threshold``). Restored afterwards."""
    old_threads = torch.get_num_threads()
    malloc_tuned = from_disk and _mmap_threshold(1 << 20)
    limiter = _blas_single_thread()
    if pooled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        if limiter is not None:
            limiter.restore_original_limits()
        if malloc_tuned:
            _mmap_threshold(32 << 20)


def _blas_single_thread():
    """Limit every loaded BLAS (torch's, scipy's OpenBLAS) to one thread while scan threads run."""
    from .spectral.blas import cblas, load_scipy_lapack

    load_scipy_lapack()  # load scipy's BLAS first: threadpoolctl only limits libraries already loaded
    cblas()  # and find the CBLAS routines once, before scan threads start
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
