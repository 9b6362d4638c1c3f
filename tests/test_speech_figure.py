"""scripts/speech_figure.py: finished and stopped runs in one table, and the comparison at one step."""

import json
import os

import pytest
from conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _figure():
    return load_script("speech_figure")


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _eval(step, wer, gap, dppl):
    return {"step": step, "wer": wer, "cer": wer / 2, "audio_gap": gap, "ctc_cer": 0.3, "dppl": dppl,
            "examples": [{"ref": "a b", "hyp": f"hyp at {step}"}]}


def _stopped_run(root, name):
    """A run killed after step 250: evaluations at 100 and 200 in the last checkpoint's trainer state (an
    older checkpoint holds stale ones), no speech_train.json."""
    run = os.path.join(root, name)
    _write(os.path.join(run, "speech_eval_step0.json"), {k: v for k, v in _eval(0, 1.6, 0.0, 0.0).items() if k != "step"})
    _write(os.path.join(run, "selection.json"), {"units": [{"numel": 100}, {"numel": 50}]})
    log = [{"step": 100, "loss": 5.0}, _eval(100, 1.2, 0.05, 1.0), {"step": 200, "loss": 4.0},
           _eval(200, 1.1, 0.10, 2.0), {"step": 250, "loss": 3.0}]
    _write(os.path.join(run, "checkpoints", "checkpoint-50", "trainer_state.json"),
           {"global_step": 50, "log_history": [_eval(50, 9.9, 9.9, 9.9)]})
    _write(os.path.join(run, "checkpoints", "checkpoint-250", "trainer_state.json"),
           {"global_step": 250, "log_history": log})
    return run


def _finished_run(root, name):
    run = os.path.join(root, name)
    history = [dict(_eval(0, 1.6, 0.0, 0.0)), _eval(100, 1.3, 0.02, 0.5), _eval(200, 1.25, 0.03, 0.6)]
    _write(os.path.join(run, "speech_train.json"),
           {"final": {**_eval(300, 1.2, 0.04, 0.7), "clips": 100}, "history": history, "train_loss": 4.5,
            "losses": [{"step": 100, "loss": 6.0}, {"step": 200, "loss": 5.0}, {"step": 300, "loss": 2.5}],
            "trainable": {"llm": 7, "llm_tensors": 1}})
    return run


def test_a_stopped_run_is_read_from_its_latest_checkpoint(tmp_path):
    mod = _figure()
    r = mod._load(_stopped_run(str(tmp_path), "lowest-seed0"))
    assert r["stopped_at"] == 250
    assert [h["step"] for h in r["history"]] == [0, 100, 200]  # step 0 from its own file, not checkpoint-50's
    assert r["final"]["wer"] == 1.1 and r["final"]["examples"][0]["hyp"] == "hyp at 200"
    assert r["train_loss"] == pytest.approx(4.0)
    assert r["trainable"] == {"llm": 150, "llm_tensors": 2}
    assert mod._label(r, None) == "lowest-seed0 (stopped at step 250; last evaluation)"


def test_at_step_compares_every_run_at_the_same_evaluation(tmp_path, capsys):
    mod = _figure()
    runs = [mod._load(_stopped_run(str(tmp_path), "lowest-seed0")), mod._load(_finished_run(str(tmp_path), "highest-seed0"))]
    assert mod._row(runs[1], 200) == [1.25, 0.625, 0.03, 0.3, 0.6, pytest.approx(5.5)]  # loss: mean of 6.0, 5.0
    assert mod._row(runs[1]) == [1.2, 0.6, 0.04, 0.3, 0.7, 4.5]  # the final row is the whole-test-set one
    mod._tables(runs, "news", 200)
    table = capsys.readouterr().out
    assert "| lowest-seed0 | 150 (2 tensors) | 1.100 |" in table and "step 200 WER" in table
    with pytest.raises(SystemExit, match="no evaluation at step 300"):
        mod._tables(runs, "news", 300)


def test_a_run_name_gives_its_selection_without_rate_or_seed():
    mod = _figure()
    assert mod._family("lowest-lr1.5e-3") == "lowest"
    assert mod._family("adaptor-only-alr3e-3") == "adaptor-only"
    assert mod._family("random-same-kind-lr2e-4-seed1") == "random-same-kind"
    assert mod._family("random-same-kind-seed0") == "random-same-kind"
    assert mod._arm("lowest-lr2e-4-seed1") == "lowest-lr2e-4"  # seeds average within one rate, never across rates


def test_tradeoff_groups_a_sweep_by_selection_in_order_of_forgetting(tmp_path, monkeypatch):
    mod = _figure()
    root = str(tmp_path)
    runs = [mod._load(_stopped_run(root, "lowest-lr1e-3")), mod._load(_finished_run(root, "lowest-lr2e-4")),
            mod._load(_finished_run(root, "highest-lr5e-4"))]
    points = mod._tradeoff_points(runs, 200, "news")
    assert points == {"lowest": [(0.6, 0.03, "lr2e-4"), (2.0, 0.10, "lr1e-3")], "highest": [(0.6, 0.03, "lr5e-4")]}
    png = tmp_path / "tradeoff.png"
    monkeypatch.setattr("sys.argv", ["speech_figure.py", *(os.path.join(root, n) for n in
                                     ("lowest-lr1e-3", "lowest-lr2e-4")), "-o", str(tmp_path / "curves.png"),
                                     "--at-step", "200", "--tradeoff", str(png)])
    mod.main()
    assert png.stat().st_size > 0 and (tmp_path / "curves.png").stat().st_size > 0
    monkeypatch.setattr("sys.argv", ["speech_figure.py", os.path.join(root, "lowest-lr1e-3"), "-o", "x.png",
                                     "--tradeoff", str(png)])
    with pytest.raises(SystemExit, match="--tradeoff needs --at-step"):
        mod.main()


def test_a_folder_without_results_is_refused(tmp_path):
    mod = _figure()
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit, match="neither speech_train.json nor a checkpoint"):
        mod._load(str(tmp_path / "empty"))


def _fig1(tmp_path, **env):
    import subprocess

    out = tmp_path / "arms"
    full = {**os.environ, "OUT": str(out), "STAGE": str(tmp_path / "stage"), **env}
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "speech_fig1.sh"), "0", "10"], env=full,
                       capture_output=True, text=True, timeout=60)
    return p, out


def test_speech_fig1_refuses_an_unknown_arm_before_writing_anything(tmp_path):
    p, out = _fig1(tmp_path, ARMS="lowest hihgest")
    assert p.returncode == 2 and "unknown arm 'hihgest'" in p.stderr
    assert not out.exists()


def test_speech_fig1_refuses_another_manifest_into_the_default_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    import subprocess

    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "speech_fig1.sh")], capture_output=True, text=True,
                       env={**env, "MANIFEST": str(tmp_path / "other.jsonl")}, timeout=60)
    assert p.returncode == 2 and "set OUT to a folder of its own" in p.stderr
