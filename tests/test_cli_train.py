"""`kappatune train` and `kappatune eval` through the real entry point on a tiny model folder."""

import json

import pytest
import torch
from transformers import TrainerCallback

from conftest import toy_rows
from conftest import one_line_error, run, run_torchrun, worker_failure


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_then_eval_end_to_end(lm_folder, tmp_path):
    data = _write_jsonl(tmp_path / "train.jsonl", toy_rows(16))
    test = _write_jsonl(tmp_path / "test.jsonl", toy_rows(8, seed=1))
    (tmp_path / "wiki.txt").write_text("plain words about many things in the world. " * 40)
    out = tmp_path / "out"
    args = ("train", str(lm_folder), "--data", str(data), "--method", "kappatune", "--budget-params", "3k",
            "--epochs", "1", "--batch-size", "4", "--lr", "0.01", "-o", str(out), "--no-progress")
    r = run(*args)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)  # stdout holds only the result JSON
    assert res["method"] == "kappatune" and res["frozen_verified"] and res["trainable_params"] <= 3000
    assert (out / "model" / "config.json").exists() and (out / "selection.json").exists()
    r = run("eval", str(out / "model"), "--control", str(tmp_path / "wiki.txt"), "--task", str(test),
            "--train-task", str(data), "--baseline", str(lm_folder), "--chunk-len", "32", "--max-chunks", "4")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["forgetting_dppl"] == pytest.approx(ev["control"]["ppl"] - ev["baseline_control"]["ppl"])
    assert ev["generalisation_gap"] == pytest.approx(ev["task_test_ppl"]["ppl"] - ev["task_train_ppl"]["ppl"])
    assert 0 <= ev["task_accuracy"]["accuracy"] <= 1 and ev["task_accuracy"]["n"] == 8
    assert "forgetting dPPL" in r.stderr and "task accuracy" in r.stderr
    # the same command again resumes from the last checkpoint: nothing left to train, same weights
    from safetensors.torch import load_file

    before = load_file(str(out / "model" / "model.safetensors"))
    r = run(*args)
    assert r.returncode == 0, r.stderr
    after = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_train_bad_data(lm_folder, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty.jsonl").write_text("")
    one_line_error(run("train", str(lm_folder), "--data", str(tmp_path / "empty.jsonl"), "-o", str(out)),
                    "no examples")
    _write_jsonl(tmp_path / "nocol.jsonl", [{"tweet": "x", "label": "a"}])
    one_line_error(run("train", str(lm_folder), "--data", str(tmp_path / "nocol.jsonl"), "-o", str(out)),
                    "column 'text'")
    _write_jsonl(tmp_path / "ok.jsonl", toy_rows(4))
    one_line_error(run("train", str(lm_folder), "--data", str(tmp_path / "ok.jsonl"), "-o", str(out),
                        "--template", "Tweet: {text}"), "no {label} field")
    one_line_error(run("train", str(lm_folder), "--data", str(tmp_path / "missing.jsonl"), "-o", str(out)),
                    "no such data file")
    one_line_error(run("train", str(tmp_path / "nomodel"), "--data", str(tmp_path / "ok.jsonl"), "-o", str(out)),
                    "not a model folder")
    one_line_error(run("train", str(lm_folder), "--data", str(tmp_path / "ok.jsonl"), "-o", str(out),
                        "--method", "magic"), "unknown method")
    assert not (out / "model").exists()


def test_eval_label_not_in_label_set(lm_folder, tmp_path):
    test = _write_jsonl(tmp_path / "t.jsonl", toy_rows(4))
    one_line_error(run("eval", str(lm_folder), "--task", str(test), "--labels", "positive,neutral"),
                    "not among the labels")


def test_frozen_tensor_callback_catches_a_moved_frozen_tensor(tmp_path):
    """The callback is a real check: corrupt a frozen tensor mid-training and it must fail."""
    from kappatune.errors import KappaTuneError
    from kappatune.train import TrainConfig, train
    from conftest import make_lm

    class Sabotage(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            with torch.no_grad():
                model.model.layers[0].self_attn.q_proj.weight[0, 0] += 1.0

    model, tok = make_lm()
    cfg = TrainConfig(method="kappatune", budget_params=1000, max_steps=2, batch_size=4, progress=False,
                      include=(r".*v_proj.*",))
    with pytest.raises(KappaTuneError, match="frozen tensor"):
        train(model, tok, toy_rows(8), str(tmp_path / "o"), cfg, extra_callbacks=[Sabotage()])


def test_two_process_ddp_training(lm_folder, tmp_path):
    """torchrun with 2 CPU processes (gloo DDP): frozen tensors bit-identical, both ranks end identical."""
    import shutil

    kt = shutil.which("kappatune")
    if kt is None:
        pytest.skip("kappatune entry point not on PATH")
    data = _write_jsonl(tmp_path / "train.jsonl", toy_rows(16))
    out = tmp_path / "out"
    r = run_torchrun("--no-python", kt, "train", str(lm_folder), "--data", str(data), "--budget-params", "3k",
                     "--max-steps", "3", "--batch-size", "2", "--lr", "0.01", "--weight-decay", "0.1",
                     "-o", str(out), "--no-progress")
    assert r.returncode == 0, worker_failure(r.stderr)
    man = json.loads((out / "manifest.json").read_text())
    assert man["world_size"] == 2 and man["ranks_identical"] is True and man["frozen_verified"]
    sel = json.loads((out / "selection.json").read_text())
    assert sorted(c["name"] for c in man["changed"]) == sorted(u["name"] for u in sel["units"])
