"""The unit planner over synthetic tensor lists: what becomes a unit, with which 2-D shape, name and slice,
and what is skipped and why (no model, no weights: ``plan_units`` only sees names, shapes, dtypes, owners)."""

import pytest

from kappatune.units import Entry, parse_slice_name, plan_units

F32 = "float32"
L0 = "model.layers.0"
EXP = f"{L0}.mlp.experts"

# (id, entries, plan_units keywords, {unit name: expected attributes}, {skipped name: reason fragment})
CASES = [
    ("linear-2d", [Entry(f"{L0}.self_attn.q_proj.weight", (32, 16), F32, "Linear")], {},
     {f"{L0}.self_attn.q_proj.weight": dict(layout="linear", shape=(32, 16), group="attention", kind="q_proj",
                                            layer=0, source_slice=None)}, {}),
    ("gpt2-conv1d-in-memory", [Entry("transformer.h.1.attn.c_attn.weight", (16, 48), F32, "Conv1D")], {},
     {"transformer.h.1.attn.c_attn.weight": dict(layout="conv1d_hf", shape=(48, 16), group="attention", layer=1)},
     {}),
    ("gpt2-conv1d-on-disk", [Entry("h.1.mlp.c_fc.weight", (16, 64), F32)], {"model_type": "gpt2"},
     {"h.1.mlp.c_fc.weight": dict(layout="conv1d_hf", shape=(64, 16), group="mlp")}, {}),
    ("conv2d-reshape", [Entry("enc.conv.weight", (6, 3, 2, 2), F32, "Conv2d")], {},
     {"enc.conv.weight": dict(layout="conv", shape=(6, 12), group="conv")}, {}),
    ("conv3d-reshape", [Entry("enc.conv3.weight", (6, 12, 2, 2, 2), F32, "Conv3d")], {},
     {"enc.conv3.weight": dict(layout="conv", shape=(6, 96), group="conv")}, {}),
    ("fused-moe", [Entry(f"{EXP}.gate_up_proj", (2, 8, 16), F32, "OlmoeExperts"),
                   Entry(f"{EXP}.down_proj", (2, 16, 4), F32, "OlmoeExperts")], {},
     {f"{EXP}.gate_up_proj@0.gate": dict(layout="expert", shape=(4, 16), expert=0, half="gate", group="expert",
                                         source=f"{EXP}.gate_up_proj", source_slice=(0, 0, 4), param_rows=(0, 4),
                                         kind="experts.gate_proj"),
      f"{EXP}.gate_up_proj@0.up": dict(shape=(4, 16), half="up", source_slice=(0, 4, 8), param_rows=(4, 8),
                                       kind="experts.up_proj"),
      f"{EXP}.gate_up_proj@1.gate": dict(expert=1, source_slice=(1, 0, 4)),
      f"{EXP}.gate_up_proj@1.up": dict(expert=1, source_slice=(1, 4, 8)),
      f"{EXP}.down_proj@0": dict(shape=(16, 4), half=None, source_slice=(0, 0, 16), kind="experts.down_proj"),
      f"{EXP}.down_proj@1": dict(expert=1, param=f"{EXP}.down_proj")}, {}),
    ("unfused-experts-on-disk", [Entry(f"{EXP}.1.gate_proj.weight", (4, 16), F32),
                                 Entry(f"{EXP}.1.up_proj.weight", (4, 16), F32),
                                 Entry(f"{EXP}.1.down_proj.weight", (16, 4), F32)], {},
     {f"{EXP}.gate_up_proj@1.gate": dict(source=f"{EXP}.1.gate_proj.weight", param=f"{EXP}.gate_up_proj",
                                         source_slice=None, param_rows=(0, 4)),
      f"{EXP}.gate_up_proj@1.up": dict(source=f"{EXP}.1.up_proj.weight", param_rows=(4, 8)),
      f"{EXP}.down_proj@1": dict(source=f"{EXP}.1.down_proj.weight", shape=(16, 4), param_rows=(0, 16))}, {}),
    ("mixtral-w1-w3-w2", [Entry(f"{L0}.block_sparse_moe.experts.0.w1.weight", (4, 16), F32),
                          Entry(f"{L0}.block_sparse_moe.experts.0.w3.weight", (4, 16), F32),
                          Entry(f"{L0}.block_sparse_moe.experts.0.w2.weight", (16, 4), F32)], {},
     {f"{EXP}.gate_up_proj@0.gate": dict(kind="experts.gate_proj"),
      f"{EXP}.gate_up_proj@0.up": dict(param_rows=(4, 8)),
      f"{EXP}.down_proj@0": dict(kind="experts.down_proj")}, {}),
    ("embeddings-skipped-by-default", [Entry("model.embed_tokens.weight", (64, 16), F32, "Embedding"),
                                       Entry("lm_head.weight", (64, 16), F32, "Linear")], {},
     {}, {"model.embed_tokens.weight": "embedding", "lm_head.weight": "embedding"}),
    ("embeddings-opt-in", [Entry("model.embed_tokens.weight", (64, 16), F32, "Embedding"),
                           Entry("lm_head.weight", (64, 16), F32, "Linear")], {"embeddings": True},
     {"model.embed_tokens.weight": dict(layout="embedding", group="embedding", shape=(64, 16)),
      "lm_head.weight": dict(layout="embedding", group="lm_head")}, {}),
    ("excluded-with-reason", [Entry(f"{L0}.mlp.up_proj.bias", (48,), F32, "Linear"),
                              Entry(f"{L0}.input_layernorm.weight", (16,), F32, "LlamaRMSNorm"),
                              Entry("model.norm.weight", (16,), F32),
                              Entry(f"{L0}.attn.scale", (16,), F32, "Attention"),
                              Entry(f"{L0}.mlp.gate.weight", (4, 16), F32, "Linear"),
                              Entry(f"{L0}.mlp.router.weight", (4, 16), F32),
                              Entry("quant.weight", (4, 4), "int8", "QLinear"),
                              Entry("empty.weight", (0, 4), F32, "Linear")], {},
     {}, {f"{L0}.mlp.up_proj.bias": "bias", f"{L0}.input_layernorm.weight": "normalisation",
          "model.norm.weight": "normalisation", f"{L0}.attn.scale": "1-D",
          f"{L0}.mlp.gate.weight": "router", f"{L0}.mlp.router.weight": "router",
          "quant.weight": "integer", "empty.weight": "empty"}),
    ("routers-opt-in", [Entry(f"{L0}.mlp.gate.weight", (4, 16), F32, "Linear")], {"include_routers": True},
     {f"{L0}.mlp.gate.weight": dict(layout="linear", shape=(4, 16))}, {}),
]


@pytest.mark.parametrize("entries, kwargs, units, skipped", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_units(entries, kwargs, units, skipped):
    plan = plan_units(entries, **kwargs)
    got = {u.name: u for u in plan.units}
    assert set(got) == set(units)
    for name, expected in units.items():
        for attr, value in expected.items():
            assert getattr(got[name], attr) == value, (name, attr)
        assert got[name].numel == got[name].shape[0] * got[name].shape[1]
        if "@" in name:  # the slice naming round-trips: param@E[.half]
            param, e, half = parse_slice_name(name)
            assert (param, e, half) == (got[name].param, got[name].expert, got[name].half)
    reasons = {s.name: s.reason for s in plan.skipped}
    assert set(reasons) == set(skipped)
    for name, fragment in skipped.items():
        assert fragment in reasons[name], (name, reasons[name])
    # every entry is accounted for exactly once: a unit's source, or skipped
    assert {u.source for u in plan.units} | set(reasons) == {e.source for e in entries}
