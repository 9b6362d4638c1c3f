"""Readable text summaries of a report (``kappatune show``) and of evaluation results (``kappatune eval``)."""

from __future__ import annotations

import math

from .report import KappaReport


def fmt(x: float) -> str:
    """4 significant digits; inf/nan as words."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def render_report(rep: KappaReport, top: int = 10) -> str:
    """Source and totals, kappa range, the ``top`` lowest and highest units, per-kind medians, units that are
    not ok and skipped tensors grouped by reason."""
    ok = [u for u in rep.units if u.status == "ok"]
    src = rep.source.get("path") or rep.source.get("class") or rep.source.get("kind")
    lines = [f"source: {src} (model_type {rep.source.get('model_type')})",
             f"units: {len(rep.units)} ({sum(u.numel for u in rep.units):,} parameters), "
             f"ok {len(ok)}, skipped tensors {len(rep.skipped)}, scan {rep.elapsed_s:.1f} s"]
    if ok:
        ks = sorted(u.kappa for u in ok)
        lines.append(f"kappa: min {fmt(ks[0])}  median {fmt(ks[len(ks) // 2])}  max {fmt(ks[-1])}")
    ordered = sorted(ok, key=lambda u: (u.kappa, u.name))
    for title, seq in ((f"lowest kappa ({min(top, len(ordered))})", ordered[:top]),
                       (f"highest kappa ({min(top, len(ordered))})", ordered[::-1][:top])):
        lines += ["", title] + [f"  {fmt(u.kappa):>10}  {u.name}  {u.shape[0]}x{u.shape[1]}" for u in seq]
    lines += ["", "per kind (median kappa, ascending)"]
    for k, v in rep.kind_medians().items():
        lines.append(f"  {k:<24} n={v['count']:<5} median {fmt(v['median_kappa']):>10}  "
                     f"range {fmt(v['min_kappa'])} .. {fmt(v['max_kappa'])}")
    bad = [u for u in rep.units if u.status != "ok"]
    if bad:
        lines += ["", f"not ok ({len(bad)})"] + [f"  {u.status:<10} {u.name} {u.message}" for u in bad[:top]]
    if rep.skipped:
        lines += ["", "skipped tensors by reason"]
        reasons: dict[str, list[str]] = {}
        for s in rep.skipped:
            reasons.setdefault(s["reason"], []).append(s["name"])
        for r, names in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  {len(names):>5}  {r}  (e.g. {names[0]})")
    return "\n".join(lines) + "\n"


def render_eval(res: dict) -> str:
    """The figures of ``evaluate.evaluate(...)`` as aligned 'name  value' lines."""
    rows = []
    if "control" in res:
        rows.append(("control PPL", f"{res['control']['ppl']:.3f}  ({res['control']['chunks']} chunks x "
                                    f"{res['control']['chunk_len']} tokens)"))
    if "baseline_control" in res:
        rows.append(("baseline control PPL", f"{res['baseline_control']['ppl']:.3f}"))
        rows.append(("forgetting dPPL", f"{res['forgetting_dppl']:+.3f}"))
    if "task_accuracy" in res:
        rows.append(("task accuracy", f"{res['task_accuracy']['accuracy']:.4f}  (n={res['task_accuracy']['n']})"))
    if "baseline_task_accuracy" in res:
        rows.append(("baseline task accuracy", f"{res['baseline_task_accuracy']['accuracy']:.4f}"))
    if "task_test_ppl" in res:
        rows.append(("task test PPL", f"{res['task_test_ppl']['ppl']:.3f}"))
    if "generalisation_gap" in res:
        rows.append(("task train PPL", f"{res['task_train_ppl']['ppl']:.3f}"))
        rows.append(("generalisation gap", f"{res['generalisation_gap']:+.3f}"))
    if not rows:
        return ""
    w = max(len(k) for k, _ in rows)
    return "".join(f"{k:<{w}}  {v}\n" for k, v in rows)
