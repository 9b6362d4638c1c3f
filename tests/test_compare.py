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
    # 5. does the kappa monitor's figure predict forgetting? (selective runs: every unique run of kappatune and
    #    random-same-kind, recomputed here)
    from statistics import correlation

    kvf = out["kappa_vs_forgetting"]
    sel = {(r["method"], r["lr"], r["seed"]): r for r in out["sweep"] + out["runs"]
           if r["method"] in ("kappatune", "random-same-kind")}
    assert kvf["runs"] == len(sel) == 6
    xs = [r["info"]["kappa_monitor"]["mean_abs_dlog10_kappa"] for r in sel.values()]
    ys = [r[f"forgetting_dnll[{cfg.controls[0]}]"] for r in sel.values()]
    assert kvf[f"r[{cfg.controls[0]}]"]["r"] == pytest.approx(correlation(xs, ys))
    own = [r for r in sel.values() if r["method"] == "kappatune"]  # and each method on its own
    assert kvf["per_method"]["kappatune"]["runs"] == len(own) == 3
    assert kvf["per_method"]["kappatune"][f"r[{cfg.controls[0]}]"]["r"] == pytest.approx(correlation(
        [r["info"]["kappa_monitor"]["mean_abs_dlog10_kappa"] for r in own],
        [r[f"forgetting_dnll[{cfg.controls[0]}]"] for r in own]))
    folder = setup["output"]
    md = open(os.path.join(folder, "results.md")).read()
    assert "Kappa monitor over 6 selective runs" in md
    assert "| kappatune | 3 | " in md.split("Per method (its sweep and seeds")[1]
    assert "Paired contrasts" in md and "[" in md
    sweep_rows = md.split("Every finished sweep run")[1].strip().splitlines()[4:]
    assert len(sweep_rows) == len(out["sweep"]) == 6 and all(row.startswith("| ") for row in sweep_rows)
    # 6. the equal-accuracy view: each method's forgetting read off its own sweep at shared accuracies
    from kappatune.frontier import accuracy_levels, bound_at_accuracy, value_at_accuracy

    view = out["at_accuracy"]
    assert view["levels"] == accuracy_levels(out["base"]["accuracy"], out["sweep"])
    metric = f"forgetting_dnll[{cfg.controls[0]}]"
    for m, per_control in view["forgetting"].items():
        runs = [r for r in out["sweep"] if r["method"] == m]
        assert per_control[cfg.controls[0]] == [value_at_accuracy(runs, lv, metric) for lv in view["levels"]]
        assert view["upper_bound"][m][cfg.controls[0]] == [bound_at_accuracy(runs, lv, metric)
                                                           for lv in view["levels"]]
    assert bool(view["levels"]) == ("at equal test accuracy" in md)
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
    assert part["missing"] == [killed.name] and part["pending_seeds"] == {}
    assert part["per_method"]["lora"]["accuracy"]["n"] == 1 and part["per_method"]["kappatune"]["accuracy"]["n"] == 2
    assert "Partial" in lab.markdown(part)
    # before any sweep is complete: the single runs, and no table of means
    for name in os.listdir(os.path.join(folder, "runs")):
        if "seed0" in name and "1e-3" not in name.replace("0.001", "1e-3"):
            os.remove(os.path.join(folder, "runs", name, "result.json"))
    early = lab.markdown(lab.analyse_existing(cfg))
    assert "No method has finished its learning-rate sweep yet" in early and "| kappatune | 0.001 |" in early
    # the count covers the whole protocol (3 methods x 2 rates, then seed 1 of each: 9 runs) minus what is
    # done (the three 1e-3 sweep runs; no sweep is complete, so no rate is chosen and the seed runs on disk
    # do not count yet): 3 sweep runs named, 3 seeds pending
    assert "**Partial**: 6 runs of the protocol are not done yet" in early
    assert "3 of them the seeds of 3 methods whose sweep is not complete" in early


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
    (dict(variants={"lora": {"method": "lora"}}), "registered method's name"),
    (dict(variants={"v": {"method": "lora", "lr": 1.0}}), "'lr' is not a setting"),
    (dict(variants={"v": {"method": "lora", "no_such_field": 1}}), "'no_such_field' is not a setting"),
    (dict(variants={"v": {"lora_alpha": 8}}), "needs the method"),
    (dict(contrasts=("kappatune:absent",)), "contrast"),
])
def test_lab_refuses_bad_input_before_training(setup, change, message):
    setup.update(change)
    with pytest.raises(KappaTuneError, match=message):
        run_lab(LabConfig(**{"methods": ("kappatune", "lora"), "seeds": 1, **setup}))
    assert not os.path.exists(os.path.join(setup["output"], "runs"))  # nothing trained


def test_lab_variants_train_their_settings_under_their_own_label(setup):
    """A variant is its method with other TrainConfig settings (the paper's fixed LoRA alpha and longer training
    here), swept, seeded and contrasted under its label like any method."""
    setup.update(lr_grid={"adapter": (1e-3,)})
    variants = {"kl-alpha8": {"method": "kappatune-lora", "lora_alpha": 8, "max_steps": 2},
                "lora-alpha8": {"method": "lora", "lora_alpha": 8}}
    cfg = LabConfig(methods=("kappatune-lora", "lora", "kl-alpha8", "lora-alpha8"), seeds=2, variants=variants,
                    contrasts=("kl-alpha8:lora-alpha8",), **setup)
    out = run_lab(cfg)
    runs = {(r["method"], r["seed"]): r for r in out["runs"]}
    assert runs[("kl-alpha8", 1)]["steps"] == 2 and runs[("kappatune-lora", 1)]["steps"] == 3
    for label, method in (("kl-alpha8", "kappatune-lora"), ("lora-alpha8", "lora")):
        info = runs[(label, 0)]["info"]
        assert info["alpha"] == 8 and runs[(method, 0)]["info"]["alpha"] == 2 * runs[(method, 0)]["info"]["rank"]
        assert runs[(label, 0)]["trainable_params"] == runs[(method, 0)]["trainable_params"]  # same budget
    con = {(c["a"], c["b"], c["metric"]) for c in out["contrasts"]}
    assert ("kl-alpha8", "lora-alpha8", "accuracy") in con and ("kappatune-lora", "lora", "accuracy") in con
    assert "kl-alpha8 = kappatune-lora with lora_alpha=8, max_steps=2" in lab.markdown(out)


def test_fixed_lora_alpha_reaches_every_adapted_module(lm_folder):
    """--lora-alpha: one alpha on every module, those with one rank more (rank_pattern) included."""
    from kappatune.methods import MethodContext, get_method
    from kappatune.train import TrainConfig, load_model

    model, _ = load_model(str(lm_folder))
    report = kappatune.scan(model, cache=False)
    for name in ("kappatune-lora", "lora"):
        m, _ = load_model(str(lm_folder))
        prep = get_method(name).prepare(m, MethodContext(lambda: report), TrainConfig(method=name, budget_params=3000,
                                                                                       lora_alpha=8))
        scalings = {v for mod in prep.model.modules() if isinstance(getattr(mod, "scaling", None), dict)
                    for v in mod.scaling.values()}
        ranks = {v for mod in prep.model.modules() if hasattr(mod, "r") and isinstance(mod.r, dict)
                 for v in mod.r.values()}
        assert scalings == {8 / r for r in ranks}, name


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


@pytest.mark.slow  # 18 tiny runs, ~1 min on 2 cores: the fast suite covers the protocol through the library
def test_compare_cli_every_peer_variant_and_contrast_on_a_tiny_model(setup, tmp_path):
    """`kappatune compare` end to end: the PEFT peers beside kappatune and its controls, a variant and an extra
    contrast; per-method figures with intervals over 2 seeds in results.json, and the markdown on stdout."""
    from conftest import run

    methods = "osf,corda-kpm,mica,pissa,dora,kappatune,random-same-kind,lora,lora-alpha8"
    r = run("compare", setup["model"], "--methods", methods, "--seeds", "2", "--lr", "1e-3",
            "--variant", "lora-alpha8=lora,lora_alpha=8", "--contrast", "lora:lora-alpha8",
            "--method-option", f"corda-kpm:corpus={setup['controls'][1]}", "--method-option",
            "corda-kpm:calib_chunks=2", "--method-option", "corda-kpm:chunk_len=32",
            "--train", setup["train"], "--test", setup["test"], "--controls", ",".join(setup["controls"]),
            "--budget-params", "3000", "--val-size", "4", "--max-steps", "2", "--batch-size", "4",
            "--chunk-len", "32", "--max-chunks", "2", "--no-isolate", "-o", str(tmp_path / "cli"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert set(out["per_method"]) == set(methods.split(","))
    assert all(out["per_method"][m]["accuracy"]["n"] == 2 for m in out["per_method"])
    assert out["best_peer"] in ("osf", "corda-kpm", "mica", "pissa", "dora")
    pairs = {(c["a"], c["b"]) for c in out["contrasts"]}
    assert {("kappatune", "random-same-kind"), ("kappatune", "lora"), ("kappatune", out["best_peer"]),
            ("lora", "lora-alpha8")} <= pairs
    assert "| kappatune | 0.001 | 2 |" in r.stdout
