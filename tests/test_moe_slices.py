"""Training single experts inside fused MoE parameters: only the selected slices move."""

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

import kappatune
from kappatune.slices import SliceAdamW, optimizer_state_bytes
from kappatune.train import TrainConfig, train
from kappatune.units import parse_slice_name
from conftest import make_lm, toy_rows


class _Spy(TrainerCallback):
    def on_train_end(self, args, state, control, optimizer=None, **kw):
        self.opt = optimizer


def _unit_view(params, unit):
    param, e, half = parse_slice_name(unit.name)
    r0, r1 = unit.param_rows
    return params[param].detach()[e, r0:r1]


@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe", "mixtral"])
def test_only_selected_slices_move(arch, tmp_path):
    model, tok = make_lm(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rep = kappatune.scan(model, cache=False)
    budget = sum(u.numel for u in sorted((u for u in rep.units if u.is_slice or "v_proj" in u.name),
                                         key=lambda u: (u.kappa, u.name))[:4])
    sel = kappatune.select(rep, budget_params=budget, include=[r".*@.*", r".*v_proj.*"])
    assert sel.has_slices
    spy = _Spy()
    cfg = TrainConfig(method="kappatune", budget_params=budget, include=(r".*@.*", r".*v_proj.*"), max_steps=4,
                      batch_size=4, lr=1e-2, weight_decay=0.1, progress=False, save_steps=100)
    res = train(model, tok, toy_rows(16), str(tmp_path / "o"), cfg, report=rep, extra_callbacks=[spy])
    assert res.frozen_verified
    chosen = set(sel.names)
    params_before = before
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "model")  # round trip through save/load
    params_after = {n: p.detach() for n, p in after.named_parameters()}
    moved_units = 0
    for u in rep.units:
        b, a = _unit_view(params_before, u) if u.is_slice else params_before[u.param], \
            _unit_view(params_after, u) if u.is_slice else params_after[u.param]
        if u.name in chosen:
            moved_units += int(not torch.equal(a, b))
        else:
            assert torch.equal(a, b), f"unselected {u.name} moved"
    assert moved_units == len(chosen)
    # every non-unit parameter (norms, embeddings, routers) is bit-identical too
    unit_params = {u.param for u in rep.units}
    for n in params_before:
        if n not in unit_params:
            assert torch.equal(params_before[n], params_after[n]), n
    # Adam state covers the selected slices only: two moments per selected value
    opt = getattr(spy.opt, "optimizer", spy.opt)  # the Trainer wraps it for accelerate
    assert isinstance(opt, SliceAdamW)
    assert optimizer_state_bytes(opt) == 2 * 4 * sel.total_params


def test_selection_from_disk_scan_applies_in_memory(tmp_path):
    model, tok = make_lm("qwen2_moe")
    model.save_pretrained(tmp_path / "m")
    rep = kappatune.scan(str(tmp_path / "m"), cache=False)  # unfused names on disk
    sel = kappatune.select(rep, count=2, groups=["expert"])
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # fused in memory
    handle = kappatune.apply(fresh, sel)
    params = dict(fresh.named_parameters())
    for u in sel.units:
        rows = handle.slice_rows[u.param]
        per = params[u.param].shape[1]
        r0, r1 = u.param_rows
        want = set(range(u.expert * per + r0, u.expert * per + r1))
        assert want <= set(rows.tolist())


def test_slice_adamw_matches_torch_adamw_on_selected_rows():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 4, 5))
    q = torch.nn.Parameter(p.detach()[1].clone())  # the same rows as a plain tensor
    rows = torch.arange(4, 8)  # expert 1 of (3, 4, 5) viewed as (12, 5)
    a = SliceAdamW([{"params": [p], "rows": rows}], lr=1e-2, weight_decay=0.1)
    b = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1, foreach=False)
    frozen = p.detach().clone()
    for _ in range(5):
        g = torch.randn(3, 4, 5)
        p.grad = g.clone()
        q.grad = g[1].clone()
        a.step()
        b.step()
    assert torch.allclose(p.detach()[1], q.detach(), atol=1e-6)
    assert torch.equal(p.detach()[0], frozen[0]) and torch.equal(p.detach()[2], frozen[2])


def test_slice_training_resumes_bit_exactly(tmp_path):
    from kappatune.errors import TrainingInterrupted
    from conftest import InterruptAt

    rows = toy_rows(32)
    cfg = TrainConfig(method="kappatune", budget_params=1500, include=(r".*@.*",), max_steps=8, batch_size=4,
                      lr=1e-2, weight_decay=0.1, progress=False, save_steps=100)
    m1, tok = make_lm("olmoe")
    train(m1, tok, rows, str(tmp_path / "a"), cfg)
    m2, tok = make_lm("olmoe")
    with pytest.raises(TrainingInterrupted):
        train(m2, tok, rows, str(tmp_path / "b"), cfg, extra_callbacks=[InterruptAt(3)])
    m3, tok = make_lm("olmoe")
    train(m3, tok, rows, str(tmp_path / "b"), cfg)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["kappatune", "highest-kappa", "random", "random-same-kind", "full", "lora",
                                    "kappatune-lora"])
def test_every_method_trains_an_moe_model(method, tmp_path):
    model, tok = make_lm("olmoe")
    cfg = TrainConfig(method=method, budget_params=1500, max_steps=2, batch_size=4, lr=1e-2, weight_decay=0.1,
                      progress=False, save_steps=100)
    res = train(model, tok, toy_rows(8), str(tmp_path / "o"), cfg)
    assert res.frozen_verified and res.changed_tensors > 0
    if method == "kappatune-lora":
        assert res.info["skipped_expert_slices"] > 0  # PEFT cannot adapt one expert: slices are left out
