"""Copy a compare run's small raw files (base.json, chosen_lrs.json, each run's result.json, selection.json,
manifest.json and kappa_monitor.json summary) into a folder that is committed, so the tables can be
regenerated there without rerunning (the lab's --analyse-only with -o that folder writes results.md/.json).

With a third argument, a markdown file, that folder's results.md replaces the text between <!-- NAME:begin --> and <!-- NAME:end -->
in that file, NAME being the folder's name: the document's tables then come from the raw files.
    python scripts/collect_lab.py runs/lab-smollm2 docs/results/lab-smollm2
    bash scripts/lab_smollm2.sh --analyse-only -o docs/results/lab-smollm2
    python scripts/collect_lab.py runs/lab-smollm2 docs/results/lab-smollm2 docs/results.md

The other way, on a fresh clone (runs/ is not committed), --restore puts the committed results back where the
lab looks for finished runs, so rerunning the lab continues it instead of retraining what is already measured:
    python scripts/collect_lab.py --restore docs/results/lab-smollm2 runs/lab-smollm2
A run already present in the destination is left as it is."""

import json
import os
import shutil
import sys


def main(src: str, dst: str) -> None:
    os.makedirs(os.path.join(dst, "runs"), exist_ok=True)
    for name in ("base.json", "chosen_lrs.json"):  # results.* are regenerated in DST by --analyse-only
        if os.path.exists(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    n = 0
    for run in sorted(os.listdir(os.path.join(src, "runs"))):
        result = os.path.join(src, "runs", run, "result.json")
        if not os.path.exists(result):
            continue  # unfinished
        out = os.path.join(dst, "runs", run)
        os.makedirs(out, exist_ok=True)
        shutil.copy2(result, out)
        for extra in ("selection.json", "manifest.json"):
            if os.path.exists(os.path.join(src, "runs", run, extra)):
                shutil.copy2(os.path.join(src, "runs", run, extra), out)
        monitor = os.path.join(src, "runs", run, "kappa_monitor.json")
        if os.path.exists(monitor):
            with open(monitor, encoding="utf-8") as f:
                summary = json.load(f)["summary"]
            with open(os.path.join(out, "kappa_monitor_summary.json"), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=1)
        n += 1
    print(f"{n} finished runs copied to {dst}")


def embed(results_md: str, doc: str, name: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    with open(doc, encoding="utf-8") as f:
        text = f.read()
    if begin not in text or end not in text:
        raise SystemExit(f"{doc}: no {begin} ... {end} markers")
    with open(results_md, encoding="utf-8") as f:
        table = f.read().strip()
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(doc, "w", encoding="utf-8") as f:
        f.write(f"{head}{begin}\n{table}\n{end}{tail}")
    print(f"{doc}: {name} tables replaced from {results_md}")


def restore(saved: str, dst: str) -> None:
    """Copy the committed runs (result.json is the lab's done marker) and base/chosen-rate files into DST."""
    os.makedirs(os.path.join(dst, "runs"), exist_ok=True)
    for name in ("base.json", "chosen_lrs.json"):
        if os.path.exists(os.path.join(saved, name)) and not os.path.exists(os.path.join(dst, name)):
            shutil.copy2(os.path.join(saved, name), os.path.join(dst, name))
    n = 0
    for run in sorted(os.listdir(os.path.join(saved, "runs"))):
        if os.path.exists(os.path.join(dst, "runs", run, "result.json")):
            continue
        out = os.path.join(dst, "runs", run)
        shutil.rmtree(out, ignore_errors=True)  # an unfinished run's leftovers
        shutil.copytree(os.path.join(saved, "runs", run), out)
        n += 1
    print(f"{n} finished runs restored into {dst}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--restore"]:
        restore(*sys.argv[2:4])
        sys.exit(0)
    main(*sys.argv[1:3])
    if len(sys.argv) > 3:
        dst = sys.argv[2].rstrip("/")
        embed(os.path.join(dst, "results.md"), sys.argv[3], os.path.basename(dst))
