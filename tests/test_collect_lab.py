"""scripts/collect_lab.py: finished lab runs go to the committed folder and come back on a fresh clone."""

import json
import os

from conftest import load_script


def _collect_lab():
    return load_script("collect_lab")


def _run(root, name, result=None, monitor=None):
    d = root / "runs" / name
    d.mkdir(parents=True)
    (d / "model").mkdir()  # a large leftover that is never copied
    if result is not None:
        (d / "result.json").write_text(json.dumps(result))
    if monitor is not None:
        (d / "kappa_monitor.json").write_text(json.dumps({"summary": monitor, "tensors": {"w": [1, 2]}}))


def test_collect_keeps_finished_runs_and_restore_puts_them_back(tmp_path):
    lab = _collect_lab()
    runs, saved, fresh = tmp_path / "runs", tmp_path / "saved", tmp_path / "fresh"
    (runs).mkdir()
    (runs / "base.json").write_text(json.dumps({"accuracy": 0.5}))
    _run(runs, "lora-lr0.001-seed0", {"accuracy": 0.6}, {"median_dlog10_kappa": 0.01})
    _run(runs, "lora-lr0.0003-seed0")  # killed: no result.json
    lab.main(str(runs), str(saved))
    assert sorted(os.listdir(saved / "runs")) == ["lora-lr0.001-seed0"]
    kept = saved / "runs" / "lora-lr0.001-seed0"
    assert sorted(os.listdir(kept)) == ["kappa_monitor_summary.json", "result.json"]
    assert json.loads((kept / "kappa_monitor_summary.json").read_text()) == {"median_dlog10_kappa": 0.01}

    # a fresh clone: one run half-done locally, one finished locally with a different result (kept as it is)
    _run(fresh, "lora-lr0.001-seed0")
    lab.restore(str(saved), str(fresh))
    assert json.loads((fresh / "runs" / "lora-lr0.001-seed0" / "result.json").read_text()) == {"accuracy": 0.6}
    assert not (fresh / "runs" / "lora-lr0.001-seed0" / "model").exists()
    assert json.loads((fresh / "base.json").read_text()) == {"accuracy": 0.5}
    (fresh / "runs" / "lora-lr0.001-seed0" / "result.json").write_text(json.dumps({"accuracy": 0.7}))
    lab.restore(str(saved), str(fresh))
    assert json.loads((fresh / "runs" / "lora-lr0.001-seed0" / "result.json").read_text()) == {"accuracy": 0.7}
