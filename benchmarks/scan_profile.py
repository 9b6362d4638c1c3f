"""Where a whole-model scan spends its time: CPU seconds per part, and how busy the cores were.

    python benchmarks/scan_profile.py --model smollm2     # real SmolLM2-135M if installed, else its shapes
    python benchmarks/scan_profile.py --model olmoe       # one OLMoE-1B-7B-shaped layer, random bf16

Wraps the BLAS/LAPACK entry points, Lanczos and the content hash with per-thread CPU timers, runs one warm-up
scan and one measured scan (cache off, default workers), and prints wall time, process CPU time, their ratio
(at most the number of workers) and each part's CPU seconds. The timers add a little overhead; the parts
overlap (Lanczos includes the products it calls).
"""

from __future__ import annotations

import argparse
import collections
import sys
import threading
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "olmoe"])
    a = ap.parse_args()
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from scan_speed import build, machine

    import kappatune
    import kappatune.scanner as sc
    import kappatune.spectral.cpu as routes
    from kappatune.spectral.blas import cblas

    model, label = build(a.model, 1)
    acc: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    lock = threading.Lock()

    def wrap(obj, name, label):
        f = getattr(obj, name)

        def timed(*args, **kw):
            t = time.thread_time()
            try:
                return f(*args, **kw)
            finally:
                with lock:
                    acc[label] += time.thread_time() - t
                    calls[label] += 1

        setattr(obj, name, timed)

    blas = cblas()
    if blas is not None:
        for n in ("syrk", "symv", "inv_gram", "gram_tri", "gram_lu", "inv_gram_lu", "potrf", "getrf"):
            wrap(blas, n, f"blas/lapack {n}")
    wrap(routes, "lanczos_max", "Lanczos (incl. its products)")  # where the CPU routes look it up
    wrap(sc, "tensor_hash", "content hash")
    kappatune.scan(model, cache=False)  # warm-up
    acc.clear()
    calls.clear()
    c0, t0 = time.process_time(), time.perf_counter()
    rep = kappatune.scan(model, cache=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"machine: {machine()}")
    print(f"model: {label}, {len(rep.units)} units")
    print(f"wall {wall:.2f} s, process CPU {cpu:.2f} s, CPU / wall {cpu / wall:.2f}")
    for k, v in sorted(acc.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<32} {v:7.3f} s CPU  ({calls[k]} calls)")


if __name__ == "__main__":
    main()
