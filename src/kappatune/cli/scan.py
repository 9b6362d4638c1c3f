"""kappatune scan, kappatune show."""

from __future__ import annotations

import logging
import sys

from .common import add_command, is_main_rank, write_json

log = logging.getLogger("kappatune")


def register(sub) -> None:
    p = add_command(
        sub, "scan", func=cmd_scan, help="measure kappa (and entropy figures) of every weight matrix of a model",
        description="Reads a model from disk, one tensor at a time, without building it, and measures how "
                    "specialised each weight matrix is (its condition number kappa, plus entropy figures). The "
                    "report is what `kappatune select` chooses from. Results are cached, so a second scan of "
                    "the same weights is instant.",
        example="kappatune scan path/to/model -o report.json --csv report.csv")
    p.add_argument("path", help="HF model folder (sharded safetensors too), a .safetensors or .gguf file, a Hub id "
                                "org/name (fetched to the HF cache: config and safetensors only), or 'smollm2'")
    p.add_argument("--revision", help="Hub branch, tag or commit (Hub ids only)")
    p.add_argument("--stream-shards", action="store_true",
                   help="Hub ids: fetch one safetensors shard at a time, scan it, delete it (disk: ~2 shards; "
                        "every scan downloads the model again; see docs/distributed.md)")
    p.add_argument("--output", "-o", help="write the report JSON here (default: stdout)")
    p.add_argument("--csv", help="also write the per-unit table as CSV")
    p.add_argument("--embeddings", action="store_true", help="also scan embeddings and LM heads")
    p.add_argument("--include-routers", action="store_true", help="also scan MoE routers")
    p.add_argument("--no-cache", action="store_true", help="recompute every spectrum, do not read/write the cache")
    p.add_argument("--cache-dir", help="cache folder (default ~/.cache/kappatune/spectra or $KAPPATUNE_CACHE_DIR)")
    p.add_argument("--exact", action="store_true", help="float64 svdvals for every unit (slower, no Gram route)")
    p.add_argument("--input-var", type=float, default=1.0, help="input variance for the entropy figures (eq. 6)")
    p.add_argument("--device", default="auto",
                   help="auto (a CUDA device when present, else CPU), cpu, cuda, cuda:N, or torch:cpu (the batched "
                        "device route run on the CPU)")
    p.add_argument("--no-progress", action="store_true")

    p = add_command(
        sub, "show", func=cmd_show, help="readable summary of a scan report",
        description="Prints what a scan found: the lowest- and highest-kappa matrices, the median kappa of each "
                    "kind of module, and which tensors were skipped and why.",
        example="kappatune show report.json --top 5")
    p.add_argument("report", help="a report JSON written by kappatune scan")
    p.add_argument("--top", type=int, default=10, help="how many lowest/highest units to list")


def cmd_scan(a) -> int:
    from ..scanner import scan

    rep = scan(_source(a), embeddings=a.embeddings, include_routers=a.include_routers,
               cache=not a.no_cache,
               cache_dir=a.cache_dir, progress=not a.no_progress, input_var=a.input_var, exact=a.exact,
               device=a.device)
    if not is_main_rank():
        return 0
    write_json(rep.to_dict(), a.output)
    if a.csv:
        rep.save_csv(a.csv)
    bad = sum(u.status != "ok" for u in rep.units)
    log.info("scanned %d units (%d skipped tensors, %d not ok, %d from cache) in %.1f s", len(rep.units),
             len(rep.skipped), bad, rep.cache_hits, rep.elapsed_s)
    return 0


def _source(a):
    """What to scan: a folder/file/'smollm2'/Hub snapshot, or with --stream-shards a Hub id streamed by shard."""
    from ..data import resolve_model
    from ..errors import KappaTuneError
    from ..hub import is_hub_id

    if not a.stream_shards:
        return resolve_model(a.path, a.revision)
    if not is_hub_id(a.path):
        raise KappaTuneError(f"{a.path}: --stream-shards applies to Hub ids (org/name), not to local files")
    from ..hub_stream import StreamingHubSource

    return StreamingHubSource(a.path, a.revision)


def cmd_show(a) -> int:
    from ..report import KappaReport
    from ..summary import render_report

    sys.stdout.write(render_report(KappaReport.load(a.report), a.top))
    return 0
