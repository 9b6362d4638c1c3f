"""The compare figures' inputs."""

import json


def test_the_kappa_monitor_figure_reads_the_summary_a_committed_run_keeps(tmp_path):
    # restored runs hold only collect_lab's kappa_monitor_summary.json; the figure was empty without it
    from kappatune.plots import seed0_monitors

    tensors = {"w": {"kappa_before": 5.0, "kappa_after": 6.0}}
    for name in ("a-lr0.001-seed0", "b-lr0.003-seed0"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    (tmp_path / "runs" / "a-lr0.001-seed0" / "kappa_monitor.json").write_text(json.dumps({"summary": {"tensors": tensors}}))
    (tmp_path / "runs" / "b-lr0.003-seed0" / "kappa_monitor_summary.json").write_text(json.dumps({"tensors": tensors}))
    got = seed0_monitors({"chosen_lr": {"a": 1e-3, "b": 3e-3, "c": 1e-3}}, str(tmp_path))
    assert got == {"a": {"summary": {"tensors": tensors}}, "b": {"summary": {"tensors": tensors}}}
