"""Copy a compare run's small raw files (base.json, chosen_lrs.json, results.json, each run's result.json,
selection.json and kappa_monitor.json summary) into a folder that is committed, so tables can be regenerated
without rerunning. Usage: python scripts/collect_lab.py runs/lab-smollm2 docs/results/lab-smollm2"""

import json
import os
import shutil
import sys


def main(src: str, dst: str) -> None:
    os.makedirs(os.path.join(dst, "runs"), exist_ok=True)
    for name in ("base.json", "chosen_lrs.json", "results.json", "results.md"):
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


if __name__ == "__main__":
    main(*sys.argv[1:3])
