import json
import os

import pytest

import kappatune
from kappatune import lab
from kappatune.errors import KappaTuneError
from kappatune.lab import LabConfig, RunSpec, run_lab
from kappatune.integrations.peft import kappatune_lora_config
from kappatune.integrations.peft import match_rank
from kappatune.methods.lora import lora_modules
from conftest import make_lm, toy_rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def setup(lm_folder, tmp_path):
    tr = _write(tmp_path / "train.jsonl", toy_rows(16))
    te = _write(tmp_path / "test.jsonl", toy_rows(6, seed=1))
    (tmp_path / "ctrl1.txt").write_text("words and more words about the world and its things. " * 30)
    (tmp_path / "ctrl2.txt").write_text("a second corpus, with other sentences in it; numbers 1 2 3. " * 30)
    return dict(model=str(lm_folder), train=tr, test=te, controls=(str(tmp_path / "ctrl1.txt"),
                str(tmp_path / "ctrl2.txt")), budget_params=3000, val_size=4, epochs=1, batch_size=4, chunk_len=32,
                max_chunks=2, isolate=False, output=str(tmp_path / "cmp"),
                lr_grid={"selective": (1e-3, 2e-2), "adapter": (1e-3, 2e-2)})


def test_lab_protocol_sweep_choose_seed_contrast_and_resume(setup, monkeypatch):
    cfg = LabConfig(methods=("kappatune", "random-same-kind", "lora"), seeds=2, **setup)
    out = run_lab(cfg)
    # 1. sweep: every method at every rate of its grid, seed 0
    assert sorted((r["method"], r["lr"], r["seed"]) for r in out["sweep"]) == sorted(
        (m, lr, 0) for m in cfg.methods for lr in (1e-3, 2e-2))
    # 2. chosen rate: best validation accuracy (ties: the smaller rate) - never forgetting
    for m in cfg.methods:
        rs = [r for r in out["sweep"] if r["method"] == m]
        assert out["chosen_lr"][m] == max(rs, key=lambda r: (r["val_accuracy"], -r["lr"]))["lr"]
    # 3. seeds at the chosen rate, seed 0 being the sweep run
    assert sorted((r["method"], r["seed"]) for r in out["runs"]) == sorted((m, s) for m in cfg.methods for s in (0, 1))
    assert all(r["lr"] == out["chosen_lr"][r["method"]] for r in out["runs"])
    base = out["base"]
    for r in out["runs"]:
        for c in cfg.controls:
            assert r[f"forgetting_dppl[{c}]"] == pytest.approx(r[f"control_ppl[{c}]"] - base[f"control_ppl[{c}]"])
            assert r[f"forgetting_dnll[{c}]"] == pytest.approx(r[f"control_nll[{c}]"] - base[f"control_nll[{c}]"])
        assert r["trainable_params"] <= 3000 * 1.5
    # 4. paired contrasts recomputed by hand
    con = {(c["a"], c["b"], c["metric"]): c for c in out["contrasts"]}
    key = f"forgetting_dnll[{cfg.controls[1]}]"
    c = con[("kappatune", "random-same-kind", key)]
    runs = {(r["method"], r["seed"]): r for r in out["runs"]}
    d = [runs[("kappatune", s)][key] - runs[("random-same-kind", s)][key] for s in (0, 1)]
    assert c["n"] == 2 and c["mean"] == pytest.approx(sum(d) / 2)
    assert c["high"] - c["mean"] == pytest.approx(12.7062 * abs(d[0] - d[1]) / 2 ** 0.5 / 2 ** 0.5, rel=1e-3)
    assert ("kappatune", "lora", "accuracy") in con and c["verdict"] in ("separated", "not separated at this power")
    folder = setup["output"]
    md = open(os.path.join(folder, "results.md")).read()
    assert "Paired contrasts" in md and "[" in md
    for png in ("frontier_ctrl1_txt.png", "frontier_ctrl2_txt.png", "kappa_monitor.png", "kappa_heatmap.png"):
        assert open(os.path.join(folder, png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # a run killed midway (no result.json) is redone; finished runs are not
    killed = RunSpec("lora", out["chosen_lr"]["lora"], 1)
    os.remove(os.path.join(folder, "runs", killed.name, "result.json"))
    calls = []
    real = lab.run_one

    def spy(cfg_, spec, run_dir):
        calls.append(spec)
        return real(cfg_, spec, run_dir)

    monkeypatch.setattr(lab, "run_one", spy)
    out2 = run_lab(cfg)
    assert calls == [killed] and len(out2["runs"]) == 6
    # --analyse-only: the finished runs only, and what is missing
    os.remove(os.path.join(folder, "runs", killed.name, "result.json"))
    part = lab.analyse_existing(cfg)
    assert part["missing"] == [killed.name]
    assert part["per_method"]["lora"]["accuracy"]["n"] == 1 and part["per_method"]["kappatune"]["accuracy"]["n"] == 2
    assert "Partial" in lab.markdown(part)


def test_lab_isolated_subprocess(setup):
    setup.update(isolate=True, lr_grid={"selective": (1e-3,)})
    out = run_lab(LabConfig(methods=("kappatune",), seeds=1, **setup))
    r = out["runs"][0]
    assert r["method"] == "kappatune" and r["peak_rss_mb"] > 50


@pytest.mark.parametrize("change, message", [
    (dict(methods=("kappatune", "no-such-method")), "unknown method"),
    (dict(max_chunks=500), "has only"),
    (dict(budget_params=10 ** 12), "budget"),
    (dict(lr_grid={"selective": ()}), "learning-rate grid"),
])
def test_lab_refuses_bad_input_before_training(setup, change, message):
    setup.update(change)
    with pytest.raises(KappaTuneError, match=message):
        run_lab(LabConfig(**{"methods": ("kappatune", "lora"), "seeds": 1, **setup}))
    assert not os.path.exists(os.path.join(setup["output"], "runs"))  # nothing trained


def test_lora_rank_matches_budget_within_one_step():
    model, _ = make_lm()
    per_rank = sum(m.in_features + m.out_features for _, m in lora_modules(model, ("q_proj", "v_proj")))
    for budget in (500, 1000, 3333, 10_000):
        r = match_rank(per_rank, budget)
        assert abs(r * per_rank - budget) <= per_rank / 2 or r == 1


def test_kappatune_lora_targets_are_the_lowest_kappa_modules_in_order():
    model, _ = make_lm()
    rep = kappatune.scan(model, cache=False)
    cfg, info = kappatune_lora_config(rep, budget_params=2000, count=4)
    lowest = [u.param[: -len(".weight")] for u in sorted(rep.units, key=lambda u: (u.kappa, u.name))][:4]
    assert info["target_modules"] == lowest  # the choice, in kappa order
    assert set(cfg.target_modules) == set(lowest)  # (PEFT stores target_modules as a set)
    assert abs(info["expected_params"] - 2000) <= sum(
        u.shape[0] + u.shape[1] for u in rep.units if u.param[:-7] in lowest) / 2
    from peft import get_peft_model

    pm = get_peft_model(model, cfg)
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == info["expected_params"]


def test_target_loss_stops_training_early(tmp_path):
    from kappatune.lab import stop_at_loss
    from kappatune.train import TrainConfig, train

    model, tok = make_lm()
    cfg = TrainConfig(method="kappatune", budget_params=3000, max_steps=10, batch_size=4, logging_steps=1,
                      progress=False, save_steps=100)
    res = train(model, tok, toy_rows(16), str(tmp_path / "a"), cfg, extra_callbacks=[stop_at_loss(1e9)])
    assert res.steps == 1
    model, tok = make_lm()
    res = train(model, tok, toy_rows(16), str(tmp_path / "b"), cfg, extra_callbacks=[stop_at_loss(-1.0)])
    assert res.steps == 10


def test_kappatune_lora_rank_pattern_lands_closer_to_budget():
    from peft import get_peft_model

    model, _ = make_lm()
    rep = kappatune.scan(model, cache=False)
    for budget in (1500, 2500, 3900):
        cfg, info = kappatune_lora_config(rep, budget_params=budget, count=4)
        coarse, cinfo = kappatune_lora_config(rep, budget_params=budget, count=4, fine_match=False)
        lowest = [u for u in sorted(rep.units, key=lambda u: (u.kappa, u.name))][:4]
        widest = max(u.shape[0] + u.shape[1] for u in lowest)
        assert abs(info["expected_params"] - budget) <= widest  # within one module step
        assert abs(info["expected_params"] - budget) <= abs(cinfo["expected_params"] - budget)
        pm = get_peft_model(make_lm()[0], cfg)
        assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == info["expected_params"]
