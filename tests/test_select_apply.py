import pytest
import yaml

import torch

import kappatune
from kappatune import KappaTuneError, Selection
from kappatune.freeze import applied_to
from kappatune.policies import ORDERS, SIZE_RULES, SelectConfig
from kappatune.report import SelectedUnit
from conftest import ARCHS, ConvNet, make_model


@pytest.fixture(scope="module")
def llama_report():
    m = make_model("llama")
    return m, kappatune.scan(m, cache=False)


def test_count_lowest_highest(llama_report):
    _, rep = llama_report
    ks = sorted(u.kappa for u in rep.units)
    low = kappatune.select(rep, count=3)
    assert [u.kappa for u in low.units] == ks[:3]
    high = kappatune.select(rep, count=3, order="highest")
    assert [u.kappa for u in high.units] == ks[::-1][:3]
    assert low.count == 3 and low.total_params == sum(u.numel for u in low.units)


def test_budget_params_is_a_prefix_of_the_order(llama_report):
    _, rep = llama_report
    order = sorted(rep.units, key=lambda u: (u.kappa, u.name))
    budget = order[0].numel + order[1].numel + order[2].numel + 1
    sel = kappatune.select(rep, budget_params=budget)
    assert sel.names == [u.name for u in order[:3]]
    assert sel.total_params <= budget
    assert kappatune.select(rep, budget_params=str(budget)).names == sel.names
    with pytest.raises(KappaTuneError, match="larger than"):
        kappatune.select(rep, budget_params="1G")
    with pytest.raises(KappaTuneError, match="smaller than the first unit"):
        kappatune.select(rep, budget_params=1)


def test_top_p_and_threshold(llama_report):
    _, rep = llama_report
    assert kappatune.select(rep, top_p=0.5).count == len(rep.units) // 2
    t = sorted(u.kappa for u in rep.units)[4]
    assert kappatune.select(rep, threshold=t).count == 5
    assert all(u.kappa >= t for u in kappatune.select(rep, threshold=t, order="highest").units)
    with pytest.raises(KappaTuneError, match="exactly one"):
        kappatune.select(rep, count=2, top_p=0.5)


def test_random_is_seeded_and_differs(llama_report):
    _, rep = llama_report
    a = kappatune.select(rep, count=5, order="random", seed=1)
    b = kappatune.select(rep, count=5, order="random", seed=1)
    c = kappatune.select(rep, count=5, order="random", seed=2)
    assert a.names == b.names and a.names != c.names


def test_random_same_kind_matches_kind_mix(llama_report):
    _, rep = llama_report
    ref = kappatune.select(rep, count=4)
    for seed in range(5):
        r = kappatune.select(rep, order="random-same-kind", like=ref, seed=seed)
        assert sorted(u.kind for u in r.units) == sorted(u.kind for u in ref.units)
        assert r.total_params == ref.total_params
    with pytest.raises(KappaTuneError, match="reference"):
        kappatune.select(rep, count=4, order="random-same-kind")


def test_patterns_fullmatch_and_errors(llama_report):
    _, rep = llama_report
    sel = kappatune.select(rep, top_p=1.0, include=[r".*\.mlp\..*"])
    assert sel.names and all(".mlp." in n for n in sel.names)
    sel = kappatune.select(rep, top_p=1.0, exclude=[r".*layers\.0\..*"])
    assert all("layers.0." not in n for n in sel.names)
    with pytest.raises(KappaTuneError, match="matches no unit"):
        kappatune.select(rep, count=1, include=["q_proj"])  # substring is not enough: full match only
    with pytest.raises(KappaTuneError, match="kind"):
        kappatune.select(rep, count=1, kinds=["nope"])
    assert {u.kind for u in kappatune.select(rep, top_p=1.0, kinds=["v_proj"]).units} == {"v_proj"}
    assert {u.group for u in kappatune.select(rep, top_p=1.0, groups=["attention"]).units} == {"attention"}
    sel = kappatune.select(rep, top_p=1.0, max_per_kind=1)
    assert len({u.kind for u in sel.units}) == sel.count


def test_ties_are_deterministic():
    from kappatune.report import KappaReport, UnitResult

    def unit(n):
        return UnitResult(n, n, n, "linear", "x", "mlp", 0, (2, 2), 4, "float32", 1, 1, 2.0, 0, 0, 0, 0, "ok", "svd")

    rep = KappaReport([unit("b.weight"), unit("a.weight"), unit("c.weight")], [], {}, {}, "f", "c")
    assert kappatune.select(rep, count=2).names == ["a.weight", "b.weight"]
    assert kappatune.select(rep, count=2, order="highest").names == ["a.weight", "b.weight"]


def test_selection_round_trip_and_exports(llama_report, tmp_path):
    model, rep = llama_report
    sel = kappatune.select(rep, count=3)
    sel.save(str(tmp_path / "s.json"))
    back = Selection.load(str(tmp_path / "s.json"))
    assert back.names == sel.names and back.structure_fingerprint == rep.structure_fingerprint
    assert back.policy["count"] == 3
    kw = sel.to_peft_kwargs()
    assert kw["target_modules"] == [n[: -len(".weight")] for n in sel.names]
    # PEFT puts adapters on exactly these modules
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(make_model("llama"), LoraConfig(r=2, **kw))
    adapted = sorted({n.split(".lora_A")[0].replace("base_model.model.", "") for n, _ in pm.named_parameters()
                      if "lora_A" in n})
    assert adapted == sorted(kw["target_modules"])
    y = yaml.safe_load(sel.to_axolotl_yaml())
    import re

    pats = y["unfrozen_parameters"]
    names = [n for n, _ in model.named_parameters()]
    matched = [n for n in names if any(re.match(p, n) for p in pats)]
    assert sorted(matched) == sorted(sel.names)
    assert "rank" in sel.to_csv().splitlines()[0]


def test_apply_sets_exactly_the_selection(llama_report):
    model, rep = llama_report
    m = make_model("llama")
    sel = kappatune.select(rep, count=4)
    s = kappatune.apply(m, sel)
    trainable = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert trainable == sorted(sel.names)
    assert s.trainable_params == sel.total_params
    assert s.all_params == sum(p.numel() for p in m.parameters())
    assert str(s).startswith("trainable params: ")
    # applying another selection leaves nothing of the first behind
    sel2 = kappatune.select(rep, count=2, order="highest")
    kappatune.apply(m, sel2)
    assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == sorted(sel2.names)


def test_apply_fingerprint_mismatch(llama_report):
    _, rep = llama_report
    sel = kappatune.select(rep, count=2)
    other = make_model("gpt2")
    with pytest.raises(KappaTuneError, match="does not match this model"):
        kappatune.apply(other, sel)
    # same architecture, different sizes -> mismatch too
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(KappaTuneError, match="fingerprint"):
        kappatune.apply(AutoModelForCausalLM.from_config(cfg), sel)
    # explicit override still refuses names that do not exist
    with pytest.raises(KappaTuneError, match="not a parameter"):
        kappatune.apply(other, sel, check=False)


def test_apply_slices_marks_rows_and_exports_refuse():
    m = make_model("olmoe")
    rep = kappatune.scan(m, cache=False)
    sel = kappatune.select(rep, count=3, groups=["expert"])
    s = kappatune.apply(m, sel)
    rows = s.slice_rows
    assert len(s.hooks) == len(rows) and applied_to(m) is s
    assert set(rows) == {u.param for u in sel.units}
    assert s.trainable_params == sel.total_params  # counted by slice, not by the whole fused tensor
    assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == sorted(rows)
    with pytest.raises(KappaTuneError, match="one expert"):
        sel.to_peft_kwargs()
    with pytest.raises(KappaTuneError, match="one expert"):
        sel.to_axolotl_yaml()
    # a plain selection afterwards removes the slice machinery
    sel2 = kappatune.select(rep, count=3, exclude=[".*@.*"])
    s2 = kappatune.apply(m, sel2)
    assert s.hooks == [] and s2.slice_rows == {} and not s2.hooks and applied_to(m) is s2
    assert not any(k.startswith("_kappatune") for k in vars(m))  # nothing of ours is left on the model
    assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == sorted(sel2.names)


# ------------------------------------------------------------------------------------------------ every architecture
ALL_ARCHS = [*ARCHS, "convnet"]


def _build(arch):
    if arch == "convnet":
        torch.manual_seed(0)
        return ConvNet()
    return make_model(arch)


@pytest.fixture(scope="module", params=ALL_ARCHS)
def arch_scan(request):
    model = _build(request.param)
    return request.param, model, kappatune.scan(model, cache=False)


def _plain(rep):
    """Every unit that is not a slice of a fused expert parameter (those no export can name)."""
    return kappatune.select(rep, top_p=1.0, exclude=[".*@.*"] if any(u.is_slice for u in rep.units) else None)


def test_selection_units_are_typed_and_round_trip_byte_for_byte(arch_scan, tmp_path):
    arch, model, rep = arch_scan
    sel = kappatune.select(rep, top_p=1.0)
    by_name = rep.by_name()
    for u in sel.units:
        assert isinstance(u, SelectedUnit)
        r = by_name[u.name]
        assert (u.param, u.kind, u.kappa, u.numel, u.shape, u.expert) == (r.param, r.kind, r.kappa, r.numel,
                                                                           tuple(r.shape), r.expert)
    sel.save(str(tmp_path / "s.json"))
    back = Selection.load(str(tmp_path / "s.json"))
    assert back == sel
    back.save(str(tmp_path / "t.json"))
    assert (tmp_path / "t.json").read_bytes() == (tmp_path / "s.json").read_bytes()


def test_peft_export_names_the_modules_that_hold_the_selection(arch_scan):
    arch, model, rep = arch_scan
    sel = _plain(rep)
    kw = sel.to_peft_kwargs()
    modules = dict(model.named_modules())
    assert kw["target_modules"] == [u.param[: -len(".weight")] for u in sel.units if u.module is not None]
    for u in sel.units:
        if u.module is None:
            assert u.param in kw["target_parameters"]
            continue
        m = modules[u.module]
        assert m.weight is dict(model.named_parameters())[u.param]
        if arch == "gpt2":  # HF Conv1D stores (in, out); the unit is reported as (out, in)
            assert type(m).__name__ == "Conv1D" and u.layout == "conv1d_hf"
            assert u.shape == (m.weight.shape[1], m.weight.shape[0])
        elif arch == "convnet" and u.name.startswith("conv"):  # ConvNd -> (out, in * k...)
            assert isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) and u.layout == "conv"
            assert u.shape == (m.out_channels, m.weight[0].numel())
        else:
            assert isinstance(m, torch.nn.Linear) and u.shape == tuple(m.weight.shape)
    if arch == "gpt2":
        assert "transformer.h.0.attn.c_attn" in kw["target_modules"]
    if arch == "convnet":
        assert set(kw["target_modules"]) == {"conv1", "conv2", "conv3", "fc"}
    # PEFT puts adapters on exactly these modules
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(_build(arch), LoraConfig(r=2, target_modules=kw["target_modules"]))
    adapted = {n.split(".lora_A")[0].replace("base_model.model.", "") for n, _ in pm.named_parameters()
               if "lora_A" in n}
    assert adapted == set(kw["target_modules"])


def test_axolotl_and_csv_exports(arch_scan):
    import csv
    import io
    import re

    arch, model, rep = arch_scan
    sel = _plain(rep)
    pats = yaml.safe_load(sel.to_axolotl_yaml())["unfrozen_parameters"]
    names = [n for n, _ in model.named_parameters()]
    assert sorted(n for n in names if any(re.match(p, n) for p in pats)) == sorted({u.param for u in sel.units})
    rows = list(csv.DictReader(io.StringIO(sel.to_csv())))
    assert [r["name"] for r in rows] == sel.names and [int(r["rank"]) for r in rows] == list(range(1, sel.count + 1))
    assert [float(r["kappa"]) for r in rows] == [u.kappa for u in sel.units]


def test_expert_slices_are_refused_by_exports(arch_scan):
    arch, model, rep = arch_scan
    if not any(u.is_slice for u in rep.units):  # no fused experts: every unit is a module's weight
        assert all(u.module is not None for u in kappatune.select(rep, top_p=1.0).units)
        return
    sel = kappatune.select(rep, count=2, groups=["expert"], include=[".*@.*"])
    assert sel.has_slices and all(u.is_slice and u.module is None for u in sel.units)
    for export in (sel.to_peft_kwargs, sel.to_axolotl_yaml):
        with pytest.raises(KappaTuneError, match="one expert"):
            export()


def test_old_selection_files_load_and_save_unchanged(tmp_path):
    """A kappatune.selection/1 file written with dict units before SelectedUnit existed."""
    import json

    old = {"units": [{"name": "a.weight", "param": "a.weight", "kind": "q_proj", "group": "attention", "layer": 0,
                      "layout": "linear", "kappa": 2.5, "numel": 12, "shape": [3, 4], "expert": None, "half": None,
                      "param_rows": None},
                     {"name": "e.gate_up_proj@1.up", "param": "e.gate_up_proj", "kind": "gate_up_proj",
                      "group": "expert", "layer": 1, "layout": "expert_fused", "kappa": "inf", "numel": 8,
                      "shape": [2, 4], "expert": 1, "half": "up", "param_rows": [2, 4]}],
           "policy": {"order": "lowest", "count": 2}, "structure_fingerprint": "f", "content_fingerprint": "c",
           "scan_options": {}, "total_params": 20, "count": 2, "kappatune_version": "0.1.0", "notes": [],
           "format": "kappatune.selection/1"}
    text = json.dumps(old, indent=1) + "\n"
    (tmp_path / "old.json").write_text(text)
    sel = Selection.load(str(tmp_path / "old.json"))
    assert sel.units[1].kappa == float("inf") and sel.units[1].param_rows == (2, 4) and sel.has_slices
    sel.save(str(tmp_path / "new.json"))
    assert (tmp_path / "new.json").read_text() == text


# ------------------------------------------------------------------------------------------------ SelectConfig
def test_select_config_validates_in_one_line(llama_report):
    _, rep = llama_report
    for kw, msg in ((dict(), "exactly one"), (dict(count=1, order="nope"), "unknown order"),
                    (dict(count=0), "positive"), (dict(top_p=1.5), r"\(0, 1\]"),
                    (dict(threshold=3.0, order="random"), "threshold applies"),
                    (dict(count=1, include=["("]), "not a valid regular expression"),
                    (dict(count=1, max_per_kind=0), "max_per_kind")):
        with pytest.raises(KappaTuneError, match=msg) as e:
            SelectConfig(**kw)
        assert "\n" not in str(e.value)
    cfg = SelectConfig(budget_params="3k", include=".*self_attn.*")
    assert cfg.budget_params == 3000 and cfg.include == (".*self_attn.*",) and cfg.size_rule == ("budget_params", 3000)
    sel = kappatune.select(rep, cfg)
    assert sel.names == kappatune.select(rep, budget_params=3000, include=[".*self_attn.*"]).names
    assert sel.policy["budget_params"] == 3000 and sel.policy["include"] == [".*self_attn.*"]
    assert kappatune.select(rep, cfg, order="highest").policy["order"] == "highest"  # keywords override


def test_select_config_fields_document_themselves():
    import dataclasses

    for f in dataclasses.fields(SelectConfig):
        assert f.metadata.get("help"), f.name
    assert set(SIZE_RULES) == {"count", "budget_params", "top_p", "threshold"}
    assert {"lowest", "highest", "random", "random-same-kind"} <= set(ORDERS)
    assert all(o.help and "\n" not in o.help for o in ORDERS.values())


def test_median_order_takes_units_nearest_the_median_kappa_first():
    from kappatune.report import KappaReport, UnitResult

    def unit(n, kappa):
        return UnitResult(n, n, n, "linear", "x", "mlp", 0, (2, 2), 4, "float32", 1, 1, kappa, 0, 0, 0, 0, "ok", "svd")

    ks = {"a": 1.0, "b": 5.0, "c": 10.0, "d": 20.0, "e": 1000.0, "f": 2.0}  # median 7.5
    rep = KappaReport([unit(n, k) for n, k in ks.items()], [], {}, {}, "f", "c")
    # |log(k / 7.5)|: c 0.288, b 0.405, d 0.981, f 1.32, a 2.01, e 4.89
    assert kappatune.select(rep, count=6, order="median").names == ["c", "b", "d", "f", "a", "e"]
    ties = KappaReport([unit("y", 2.0), unit("x", 8.0), unit("m", 4.0)], [], {}, {}, "f", "c")  # 2 and 8: same ratio
    assert kappatune.select(ties, count=3, order="median").names == ["m", "x", "y"]
    assert kappatune.select(rep, count=2, order="median").policy["seed"] is None  # not a seeded order


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_apply_then_a_training_step_moves_only_the_selection(arch):
    """On every architecture (GPT-2's Conv1D and a ConvNet included; fused-expert slices on the MoE ones): apply
    freezes all but the selection, the summary counts exactly the selection, and one SliceAdamW step with
    weight decay changes the selected tensors (rows) and leaves every other byte identical."""
    from kappatune.freeze import snapshot
    from kappatune.slices import build_optimizer

    model = _build(arch)
    rep = kappatune.scan(model, cache=False)
    sel = kappatune.select(rep, top_p=0.3, order="random", seed=1)
    handle = kappatune.apply(model, sel)
    assert handle.trainable_params == sel.total_params
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted({u.param for u in sel.units})
    frozen = snapshot(model)  # frozen tensors + unselected rows of fused parameters
    before = {u.param: dict(model.named_parameters())[u.param].detach().clone() for u in sel.units}
    opt = build_optimizer(model, sel, lr=1e-2, weight_decay=0.1)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()
    assert kappatune.changed(model, frozen) == []
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], b) for n, b in before.items())
