import pytest
import yaml

import kappatune
from kappatune import KappaTuneError, Selection
from conftest import make_model


@pytest.fixture(scope="module")
def llama_report():
    m = make_model("llama")
    return m, kappatune.scan(m, cache=False)


def test_count_lowest_highest(llama_report):
    _, rep = llama_report
    ks = sorted(u.kappa for u in rep.units)
    low = kappatune.select(rep, count=3)
    assert [u["kappa"] for u in low.units] == ks[:3]
    high = kappatune.select(rep, count=3, order="highest")
    assert [u["kappa"] for u in high.units] == ks[::-1][:3]
    assert low.count == 3 and low.total_params == sum(u["numel"] for u in low.units)


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
    assert all(u["kappa"] >= t for u in kappatune.select(rep, threshold=t, order="highest").units)
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
        assert sorted(u["kind"] for u in r.units) == sorted(u["kind"] for u in ref.units)
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
    assert {u["kind"] for u in kappatune.select(rep, top_p=1.0, kinds=["v_proj"]).units} == {"v_proj"}
    assert {u["group"] for u in kappatune.select(rep, top_p=1.0, groups=["attention"]).units} == {"attention"}
    sel = kappatune.select(rep, top_p=1.0, max_per_kind=1)
    assert len({u["kind"] for u in sel.units}) == sel.count


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
    rows = m._kappatune_slice_rows
    assert set(rows) == {u["param"] for u in sel.units}
    assert s.trainable_params == sel.total_params  # counted by slice, not by the whole fused tensor
    assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == sorted(rows)
    with pytest.raises(KappaTuneError, match="one expert"):
        sel.to_peft_kwargs()
    with pytest.raises(KappaTuneError, match="one expert"):
        sel.to_axolotl_yaml()
    # a plain selection afterwards removes the slice machinery
    sel2 = kappatune.select(rep, count=3, exclude=[".*@.*"])
    kappatune.apply(m, sel2)
    assert m._kappatune_slice_rows == {} and not m._kappatune_hooks
    assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == sorted(sel2.names)
