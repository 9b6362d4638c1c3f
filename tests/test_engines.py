"""Activation checkpointing with frozen embeddings, and the FSDP / DeepSpeed settings of `train`."""

import json

import pytest
import torch

import kappatune
from conftest import make_lm, run_torchrun, toy_rows, worker_failure
from kappatune.errors import KappaTuneError


def _selected_grads(model, name, ids):
    model.zero_grad(set_to_none=True)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return dict(model.named_parameters())[name].grad


def _lm_with_mid_layer_selected():
    model, tok = make_lm("llama")
    rep = kappatune.scan(model, cache=False)
    sel = kappatune.select(rep, count=1, include=[r"model\.layers\.1\.mlp\.down_proj\.weight"])
    kappatune.apply(model, sel)
    assert not model.get_input_embeddings().weight.requires_grad
    return model, tok, sel.names[0]


def test_reentrant_checkpointing_with_frozen_embeddings_loses_the_gradient_and_we_restore_it():
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    model, _, name = _lm_with_mid_layer_selected()
    ref = _selected_grads(model, name, ids).clone()
    assert ref.abs().sum() > 0
    # the hazard: reentrant checkpointing whose block inputs do not require grad returns no gradient
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    try:
        g = _selected_grads(model, name, ids)
    except RuntimeError as e:  # nothing in the graph requires grad any more
        assert "does not require grad" in str(e)
        g = None
    assert g is None
    # our helper, reentrant or not, gives the selected tensor its exact gradient back
    from kappatune.integrations.trainer import enable_activation_checkpointing

    for reentrant in (True, False):
        m, _, n = _lm_with_mid_layer_selected()
        enable_activation_checkpointing(m, use_reentrant=reentrant)
        assert getattr(m, "is_activation_checkpointing", None) or m.is_gradient_checkpointing
        torch.testing.assert_close(_selected_grads(m, n, ids), ref, rtol=1e-5, atol=1e-7)


def test_train_with_gradient_checkpointing_matches_plain_training(tmp_path):
    from kappatune.train import TrainConfig, train

    rows = toy_rows(16)
    outs = {}
    for gc in (False, True):
        model, tok = make_lm("llama")
        cfg = TrainConfig(method="kappatune", budget_params="3k", epochs=1, batch_size=4, lr=1e-2,
                          gradient_checkpointing=gc, progress=False)
        res = train(model, tok, rows, str(tmp_path / f"gc{gc}"), cfg)
        assert res.frozen_verified and res.changed_tensors > 0
        outs[gc] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n in outs[False]:
        torch.testing.assert_close(outs[True][n], outs[False][n], rtol=1e-5, atol=1e-6)


def test_fsdp_settings_force_use_orig_params_and_refuse_the_opposite(tmp_path):
    from kappatune.engines import engine_args
    from kappatune.train import TrainConfig

    a = engine_args(TrainConfig(fsdp="full_shard auto_wrap", fsdp_config={"version": 1}))
    assert a["fsdp"] == "full_shard auto_wrap" and a["fsdp_config"]["use_orig_params"] is True
    p = tmp_path / "fsdp.json"
    p.write_text(json.dumps({"version": 1, "use_orig_params": False}))
    with pytest.raises(KappaTuneError, match="use_orig_params"):
        engine_args(TrainConfig(fsdp="full_shard", fsdp_config=str(p)))
    # FSDP2 (transformers' default) keeps per-parameter requires_grad: nothing to force
    for fc in ({"version": 2}, None):
        assert "use_orig_params" not in engine_args(TrainConfig(fsdp="full_shard", fsdp_config=fc))["fsdp_config"]
    with pytest.raises(KappaTuneError, match="not both"):
        engine_args(TrainConfig(fsdp="full_shard", deepspeed={"zero_optimization": {"stage": 3}}))
    with pytest.raises(KappaTuneError, match="fsdp-config"):
        engine_args(TrainConfig(fsdp="full_shard", fsdp_config=str(tmp_path / "missing.json")))


def test_fsdp2_two_cpu_processes_train_the_selection_like_one_process(tmp_path):
    """FSDP2 (fully_shard per decoder layer) on 2 gloo processes: frozen tensors bit-identical, the selected
    ones equal to single-process training on both ranks' batches, and scanning a sharded model is refused."""
    import os

    from safetensors.torch import load_file

    import fsdp2_worker

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    r = run_torchrun(os.path.join(here, "fsdp2_worker.py"), str(tmp_path / "fsdp"), env=env, timeout=240)
    assert r.returncode == 0, worker_failure(r.stderr)
    info = json.loads((tmp_path / "fsdp.json").read_text())
    got = load_file(str(tmp_path / "fsdp.safetensors"))
    assert info["ranks_identical"] and info["scan_refused"] and info["units"] == 2
    # the same selection trained in one process on both batches
    model, _ = make_lm("llama")
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sel = kappatune.select(kappatune.scan(model, cache=False), count=3)
    assert sel.names == info["selected"]
    kappatune.apply(model, sel)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.cat([fsdp2_worker.batch(0), fsdp2_worker.batch(1)])
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    ref = model.state_dict()
    for k, v in got.items():
        if k in sel.names:
            assert not torch.equal(v, init[k])
            torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(v, init[k]), k


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU-only machines")
def test_cli_train_fsdp_on_cpu_is_refused_before_writing_anything(lm_folder, tmp_path):
    from conftest import one_line_error, run

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in toy_rows(8)))
    out = tmp_path / "out"
    one_line_error(run("train", str(lm_folder), "--data", str(data), "--fsdp", "full_shard auto_wrap",
                        "-o", str(out)), "FSDP", "GPU")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_deepspeed_zero3_two_cpu_processes_match_ddp(lm_folder, tmp_path):
    """DeepSpeed ZeRO-3 (2 CPU processes, gloo): frozen tensors bit-identical to the input model, both ranks
    identical, and the trained weights equal to a 2-process DDP run of the same command."""
    pytest.importorskip("deepspeed")
    import os
    import shutil

    from safetensors.torch import load_file

    kt = shutil.which("kappatune")
    if kt is None:
        pytest.skip("kappatune entry point not on PATH")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in toy_rows(16)))
    ds_cfg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "distributed",
                          "ds_zero3.json")
    outs = {}
    for name, extra in (("zero3", ["--deepspeed", ds_cfg]), ("ddp", [])):
        out = tmp_path / name
        r = run_torchrun("--no-python", kt, "train", str(lm_folder), "--data", str(data), "--budget-params", "3k",
                         "--max-steps", "3", "--batch-size", "2", "--lr", "0.01", "-o", str(out), "--no-progress",
                         *extra)
        assert r.returncode == 0, worker_failure(r.stderr)
        man = json.loads((out / "manifest.json").read_text())
        assert man["world_size"] == 2 and man["ranks_identical"] is True and man["frozen_verified"]
        outs[name] = (man, load_file(str(out / "model" / "model.safetensors")))
    base = load_file(str(lm_folder / "model.safetensors"))
    man, w = outs["zero3"]
    selected = {c["name"] for c in man["changed"]}
    assert selected and all(c["numel"] > 0 for c in man["changed"])
    for k, v in base.items():
        if k in selected:
            assert not torch.equal(w[k], v)
            torch.testing.assert_close(w[k], outs["ddp"][1][k], rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(w[k], v), k


def test_worker_failure_shows_the_fatal_error_block_before_the_tail():
    """The helper the torchrun tests report failures with: faulthandler's cause and stack survive the long
    extension-module list that follows them (a plain stderr tail kept only that list)."""
    stderr = ("[rank1]: Fatal Python error: Aborted\n\nThread 0x7f (most recent call first):\n"
              '  File "train.py", line 12 in step\n[rank1]: Extension modules: numpy, torch, ' + "x, " * 2000
              + "\ntorchrun: worker 1 failed\n")
    shown = worker_failure(stderr, tail=200)
    head = shown.split("...")[0]
    assert "Fatal Python error: Aborted" in head and 'line 12 in step' in head and "Extension modules" not in head
    assert shown.endswith("torchrun: worker 1 failed\n") and len(shown) < 600
    assert worker_failure("plain error\n", tail=50) == "\nplain error\n"  # no fatal block: the tail alone
