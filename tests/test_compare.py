import json
import os

import pytest

import kappatune
from kappatune import experiments
from kappatune.experiments import CompareConfig, aggregate, compare_tables, run_compare
from kappatune.integrations.peft import kappatune_lora_config
from kappatune.train import lora_modules, match_rank
from conftest import make_lm, toy_rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def setup(lm_folder, tmp_path):
    tr = _write(tmp_path / "train.jsonl", toy_rows(12))
    te = _write(tmp_path / "test.jsonl", toy_rows(6, seed=1))
    (tmp_path / "ctrl.txt").write_text("words and more words about the world and its things. " * 30)
    return dict(model=str(lm_folder), train=tr, test=te, control=str(tmp_path / "ctrl.txt"), budget_params=3000,
                epochs=1, batch_size=4, chunk_len=32, max_chunks=2, isolate=False, output=str(tmp_path / "cmp"))


def test_compare_table_holds_every_method_and_seed_and_resumes(setup, monkeypatch):
    cfg = CompareConfig(methods=("kappatune", "lora", "random-same-kind"), seeds=2, **setup)
    out = run_compare(cfg)
    pairs = sorted((r["method"], r["seed"]) for r in out["runs"])
    assert pairs == sorted((m, s) for m in cfg.methods for s in range(2))
    assert [a["method"] for a in out["aggregate"]] == list(cfg.methods) and all(a["n"] == 2 for a in out["aggregate"])
    for r in out["runs"]:
        assert r["forgetting_dppl"] == pytest.approx(r["control_ppl"] - out["base"]["control_ppl"])
        assert r["trainable_params"] <= 3000 * 1.5
    folder = setup["output"]
    md = open(os.path.join(folder, "results.md")).read()
    assert md.count("\n| ") >= 4 and "±" in md
    assert open(os.path.join(folder, "results.csv")).read().startswith("method,n,accuracy_mean")
    for png in ("forgetting_vs_accuracy.png", "kappa_distribution.png", "kappa_heatmap.png"):
        p = os.path.join(folder, png)
        assert os.path.getsize(p) > 2000
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # a run killed midway (no result.json) is redone; finished runs are not
    killed = os.path.join(folder, "runs", "lora-seed1")
    os.remove(os.path.join(killed, "result.json"))
    calls = []
    real = experiments.run_one

    def spy(cfg_, method, seed, run_dir):
        calls.append((method, seed))
        return real(cfg_, method, seed, run_dir)

    monkeypatch.setattr(experiments, "run_one", spy)
    out2 = run_compare(cfg)
    assert calls == [("lora", 1)]
    assert len(out2["runs"]) == 6


def test_compare_isolated_subprocess(setup):
    setup["isolate"] = True
    out = run_compare(CompareConfig(methods=("kappatune",), seeds=1, **setup))
    r = out["runs"][0]
    assert r["method"] == "kappatune" and r["peak_rss_mb"] > 50


def test_aggregate_hand_made():
    runs = [{"method": "a", "accuracy": 0.5, "forgetting_dppl": 1.0}, {"method": "a", "accuracy": 0.7,
            "forgetting_dppl": 3.0}, {"method": "b", "accuracy": 0.6, "forgetting_dppl": 2.0}]
    agg = aggregate(runs, ("a", "b"))
    a = agg[0]
    assert a["n"] == 2 and a["accuracy_mean"] == pytest.approx(0.6) and a["accuracy_std"] == pytest.approx(0.141421356)
    assert a["forgetting_dppl_mean"] == pytest.approx(2.0) and a["forgetting_dppl_std"] == pytest.approx(1.41421356)
    assert agg[1]["accuracy_std"] == 0.0
    md, csv_text = compare_tables(agg)
    assert "0.600 ± 0.141" in md and "+2.000 ± 1.414" in md


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
    from kappatune.experiments import _TargetLoss
    from kappatune.train import TrainConfig, train

    model, tok = make_lm()
    cfg = TrainConfig(method="kappatune", budget_params=3000, max_steps=10, batch_size=4, logging_steps=1,
                      progress=False, save_steps=100)
    res = train(model, tok, toy_rows(16), str(tmp_path / "a"), cfg, extra_callbacks=[_TargetLoss.make(1e9)])
    assert res.steps == 1
    model, tok = make_lm()
    res = train(model, tok, toy_rows(16), str(tmp_path / "b"), cfg, extra_callbacks=[_TargetLoss.make(-1.0)])
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
