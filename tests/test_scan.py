import math

import numpy as np
import pytest
import torch

import kappatune
from kappatune.units import parse_slice_name
from conftest import ConvNet, make_model, np_kappa, run_torchrun


def _reference_units(model):
    """Independent enumeration of the expected unit matrices (the paper's reshape rules), by hand."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for mname, mod in model.named_modules():
        pre = f"{mname}." if mname else ""
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in mname and not mname.endswith((".gate", "shared_expert_gate")):
            out[pre + "weight"] = mod.weight.detach()
        elif isinstance(mod, Conv1D):
            out[pre + "weight"] = mod.weight.detach().T
        elif isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            out[pre + "weight"] = mod.weight.detach().reshape(mod.weight.shape[0], -1)
    for n, p in model.named_parameters():
        if p.dim() == 3 and n.endswith("experts.gate_up_proj"):
            i = p.shape[1] // 2
            for e in range(p.shape[0]):
                out[f"{n}@{e}.gate"] = p[e, :i].detach()
                out[f"{n}@{e}.up"] = p[e, i:].detach()
        elif p.dim() == 3 and n.endswith("experts.down_proj"):
            for e in range(p.shape[0]):
                out[f"{n}@{e}"] = p[e].detach()
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "olmoe", "qwen2_moe", "mixtral"])
def test_every_unit_matches_numpy_float64_svd(arch):
    model = make_model(arch)
    rep = kappatune.scan(model, cache=False)
    ref = _reference_units(model)
    got = rep.by_name()
    assert set(got) == set(ref), set(got) ^ set(ref)
    for name, mat in ref.items():
        u = got[name]
        assert u.status == "ok"
        assert tuple(u.shape) == tuple(mat.shape)
        k = np_kappa(mat.numpy())
        assert abs(u.kappa - k) / k < 1e-6, name
        s = np.linalg.svd(mat.double().numpy(), compute_uv=False)
        assert u.log_volume == pytest.approx(float(np.sum(np.log2(s))), abs=1e-6)
    reasons = {s["name"]: s["reason"] for s in rep.skipped}
    if arch in ("olmoe", "qwen2_moe", "mixtral"):
        assert any("router" in r for n, r in reasons.items() if n.endswith("mlp.gate.weight"))
        assert rep.by_name()[next(iter(n for n in got if "@" in n))].group == "expert"
    assert all(("norm" in r or "embedding" in r or "router" in r or "bias" in r or "1-D" in r)
               for r in reasons.values())


def test_gpt2_conv1d_reported_as_out_in():
    model = make_model("gpt2")
    u = kappatune.scan(model, cache=False).by_name()["transformer.h.0.attn.c_attn.weight"]
    assert u.shape == (96, 32) and u.layout == "conv1d_hf" and u.layer == 0


def test_conv_net_reshape_and_exclusions():
    m = ConvNet()
    rep = kappatune.scan(m, cache=False)
    got = rep.by_name()
    assert got["conv1.weight"].shape == (8, 3 * 5)
    assert got["conv2.weight"].shape == (12, 8 * 3 * 2)
    assert got["conv3.weight"].shape == (6, 12 * 8)
    assert got["conv2.weight"].group == "conv"
    for name in ("conv1.weight", "conv2.weight", "conv3.weight", "fc.weight"):
        w = dict(m.named_parameters())[name].detach()
        assert got[name].kappa == pytest.approx(np_kappa(w.reshape(w.shape[0], -1).numpy()), rel=1e-6)
    skipped = {s["name"]: s["reason"] for s in rep.skipped}
    assert set(skipped) == {"conv1.bias", "conv2.bias", "conv3.bias", "bn.weight", "bn.bias", "fc.bias"}


def test_embeddings_only_when_asked():
    m = make_model("llama")
    assert "model.embed_tokens.weight" not in kappatune.scan(m, cache=False).by_name()
    rep = kappatune.scan(m, cache=False, embeddings=True)
    assert rep.by_name()["model.embed_tokens.weight"].group == "embedding"
    assert rep.by_name()["lm_head.weight"].group == "lm_head"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "olmoe", "qwen2_moe", "mixtral"])
def test_scan_on_disk_equals_scan_in_memory(arch, tmp_path):
    model = make_model(arch)
    model.save_pretrained(tmp_path / "m")
    mem = kappatune.scan(model, cache=False)
    disk = kappatune.scan(str(tmp_path / "m"), cache=False)
    assert disk.structure_fingerprint == mem.structure_fingerprint
    assert disk.content_fingerprint == mem.content_fingerprint
    dm, mm = disk.by_name(), mem.by_name()
    assert set(dm) == set(mm)
    for n in mm:
        assert dm[n].kappa == pytest.approx(mm[n].kappa, rel=1e-12), n
        assert dm[n].param == mm[n].param and dm[n].param_rows == mm[n].param_rows
    if arch in ("olmoe", "qwen2_moe", "mixtral"):
        # the report's name map sends in-memory slice names to the unfused keys on disk ...
        nm = disk.name_map()
        assert nm and all(parse_slice_name(k) for k in nm)
        # ... and the mapping is right: the disk tensor is exactly the in-memory slice
        from safetensors.torch import load_file

        sd = load_file(str(tmp_path / "m" / "model.safetensors"))
        params = dict(model.named_parameters())
        for name, key in nm.items():
            param, e, half = parse_slice_name(name)
            r0, r1 = dm[name].param_rows
            assert torch.equal(params[param].detach()[e, r0:r1], sd[key]), (name, key)


def test_sharded_checkpoint_and_bf16(tmp_path):
    model = make_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    disk = kappatune.scan(str(tmp_path / "m"), cache=False)
    for name, p in model.named_parameters():
        if name in disk.by_name():
            u = disk.by_name()[name]
            assert u.dtype == "bfloat16"
            assert u.kappa == pytest.approx(np_kappa(p.detach().double().numpy()), rel=1e-6)


def test_single_safetensors_file_with_conv_4d(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    t = {"enc.conv.weight": torch.randn(6, 3, 2, 2), "enc.conv.bias": torch.randn(6), "head.weight": torch.randn(4, 7)}
    save_file(t, str(tmp_path / "x.safetensors"))
    rep = kappatune.scan(str(tmp_path / "x.safetensors"), cache=False)
    u = rep.by_name()["enc.conv.weight"]
    assert u.shape == (6, 12) and u.layout == "conv"
    assert u.kappa == pytest.approx(np_kappa(t["enc.conv.weight"].reshape(6, -1).numpy()), rel=1e-6)


def test_order_agrees_with_peft_find_kappa_target_modules():
    from peft import find_kappa_target_modules

    model = make_model("llama")
    rep = kappatune.scan(model, cache=False)
    peft_all = find_kappa_target_modules(model, top_p=1.0, show_progress=False)["target_modules"]
    peft_all = [m for m in peft_all if m != "lm_head"]
    ours = [u.param[: -len(".weight")] for u in sorted(rep.units, key=lambda u: (u.kappa, u.name))]
    assert ours == peft_all
    sel = kappatune.select(rep, top_p=0.25)
    peft_sel = find_kappa_target_modules(model, top_p=0.25, show_progress=False)["target_modules"]
    # PEFT counts lm_head among its candidates; compare the orderings, not the cut
    assert [n[: -len('.weight')] for n in sel.names] == [m for m in peft_sel if m != "lm_head"][: sel.count]


def test_cache_hits_and_recomputes_changed_weights(tmp_path):
    model = make_model("llama")
    a = kappatune.scan(model)
    assert a.cache_hits == 0
    b = kappatune.scan(model)
    assert b.cache_hits == len(b.units)
    assert [u.kappa for u in a.units] == [u.kappa for u in b.units]
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(torch.linspace(0.1, 3, 32)[:, None])
    c = kappatune.scan(model)
    assert c.cache_hits == len(c.units) - 1
    assert c.by_name()["model.layers.0.self_attn.q_proj.weight"].kappa != \
        a.by_name()["model.layers.0.self_attn.q_proj.weight"].kappa
    # the same weights under another file name come from the cache
    model.save_pretrained(tmp_path / "elsewhere")
    d = kappatune.scan(str(tmp_path / "elsewhere"))
    assert d.cache_hits == len(d.units)
    assert kappatune.scan(model, cache=False).cache_hits == 0


def test_bad_tensor_does_not_abort_scan(caplog):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
        model.model.layers[0].mlp.down_proj.weight.zero_()
    with caplog.at_level("WARNING"):
        rep = kappatune.scan(model, cache=False)
    by = rep.by_name()
    assert by["model.layers.1.mlp.up_proj.weight"].status == "nonfinite"
    assert by["model.layers.0.mlp.down_proj.weight"].status == "singular"
    assert by["model.layers.0.mlp.down_proj.weight"].kappa == math.inf
    assert sum(u.status == "ok" for u in rep.units) == len(rep.units) - 2
    assert "NaN or Inf" in caplog.text
    # selection ignores them by default
    sel = kappatune.select(rep, top_p=1.0)
    assert "model.layers.1.mlp.up_proj.weight" not in sel.names
    assert "model.layers.0.mlp.down_proj.weight" not in sel.names


def test_report_round_trip_with_inf(tmp_path):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()
    rep = kappatune.scan(model, cache=False)
    rep.save(str(tmp_path / "r.json"))
    back = kappatune.KappaReport.load(str(tmp_path / "r.json"))
    assert back.by_name()["model.layers.0.mlp.down_proj.weight"].kappa == math.inf
    assert [u.kappa for u in back.units] == [u.kappa for u in rep.units]
    text = (tmp_path / "r.json").read_text()
    assert "Infinity" not in text and "NaN" not in text


def _write_gguf(path, tensors, arch="llama"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    for name, t in tensors.items():
        w.add_tensor(name, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_names_map_to_transformers_and_kappas_match(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {
        "token_embd.weight": torch.randn(64, 16, generator=g),
        "blk.0.attn_q.weight": torch.randn(16, 16, generator=g),
        "blk.0.attn_v.weight": torch.randn(8, 16, generator=g),
        "blk.0.attn_norm.weight": torch.randn(16, generator=g),
        "blk.1.ffn_down.weight": torch.randn(16, 24, generator=g),
        "blk.1.ffn_gate_exps.weight": torch.randn(3, 12, 16, generator=g),
        "blk.1.ffn_up_exps.weight": torch.randn(3, 12, 16, generator=g),
        "blk.1.ffn_down_exps.weight": torch.randn(3, 16, 12, generator=g),
    }
    _write_gguf(tmp_path / "m.gguf", t)
    rep = kappatune.scan(str(tmp_path / "m.gguf"), cache=False)
    by = rep.by_name()
    assert rep.source["model_type"] == "llama"
    assert by["model.layers.0.self_attn.q_proj.weight"].kappa == pytest.approx(np_kappa(t["blk.0.attn_q.weight"]), rel=1e-6)
    assert by["model.layers.0.self_attn.v_proj.weight"].shape == (8, 16)
    assert by["model.layers.1.mlp.down_proj.weight"].kappa == pytest.approx(np_kappa(t["blk.1.ffn_down.weight"]), rel=1e-6)
    for e in range(3):
        assert by[f"model.layers.1.mlp.experts.gate_up_proj@{e}.gate"].kappa == pytest.approx(
            np_kappa(t["blk.1.ffn_gate_exps.weight"][e]), rel=1e-6)
        assert by[f"model.layers.1.mlp.experts.gate_up_proj@{e}.up"].param_rows == (12, 24)
        assert by[f"model.layers.1.mlp.experts.down_proj@{e}"].kappa == pytest.approx(
            np_kappa(t["blk.1.ffn_down_exps.weight"][e]), rel=1e-6)
    assert "model.embed_tokens.weight" in {s["name"] for s in rep.skipped}


def test_parallel_serial_and_budgeted_scans_agree(tmp_path):
    model = make_model("qwen2_moe")
    model.save_pretrained(tmp_path / "m")
    a = kappatune.scan(str(tmp_path / "m"), cache=False, workers=1)
    b = kappatune.scan(str(tmp_path / "m"), cache=False, workers=2)
    c = kappatune.scan(str(tmp_path / "m"), cache=False, workers=2, memory_budget=1)  # one task at a time
    for r in (b, c):
        assert [(u.name, u.kappa, u.log_volume) for u in r.units] == [(u.name, u.kappa, u.log_volume) for u in a.units]
    with pytest.raises(kappatune.KappaTuneError, match="workers"):
        kappatune.scan(model, workers=0)


def test_two_process_scan_equals_single_process(tmp_path):
    """`kappatune scan` under torchrun with 2 CPU processes (gloo): rank 0 writes the same report."""
    import json
    import shutil

    model = make_model("olmoe")
    model.save_pretrained(tmp_path / "m")
    single = kappatune.scan(str(tmp_path / "m"), cache=False)
    kt = shutil.which("kappatune")
    if kt is None:
        pytest.skip("kappatune entry point not on PATH")
    out = tmp_path / "r.json"
    r = run_torchrun("--no-python", kt, "scan", str(tmp_path / "m"), "-o", str(out), "--no-cache",
                     "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["structure_fingerprint"] == single.structure_fingerprint
    assert d["content_fingerprint"] == single.content_fingerprint
    got = {u["name"]: float(u["kappa"]) for u in d["units"]}
    assert got == {u.name: u.kappa for u in single.units}


def test_fused_tensor_units_are_spread_over_workers_and_loaded_once(tmp_path, monkeypatch):
    """A fused MoE tensor is one source but many units: its units run on several workers at once (one
    task per unit), while the tensor itself is read from disk exactly once."""
    import threading

    from kappatune import scan_routes
    from kappatune.sources import ModuleSource

    model = make_model("olmoe")  # in memory, transformers 5 keeps each layer's experts in fused tensors
    loads: dict[str, int] = {}
    threads: dict[str, set] = {}
    orig_load = ModuleSource.load

    def counting_load(self, key):
        loads[key] = loads.get(key, 0) + 1
        return orig_load(self, key)

    orig_unit_matrix = scan_routes.unit_matrix

    def recording_unit_matrix(spec, tensor):
        import time

        time.sleep(0.002)  # long enough that the other worker picks up the next unit meanwhile
        threads.setdefault(spec.source, set()).add(threading.get_ident())
        return orig_unit_matrix(spec, tensor)

    monkeypatch.setattr(ModuleSource, "load", counting_load)
    monkeypatch.setattr(scan_routes, "unit_matrix", recording_unit_matrix)  # where the routes look it up
    rep = kappatune.scan(model, cache=False, workers=2)
    fused = [k for k in loads if "experts" in k]
    assert fused and all(n == 1 for n in loads.values()), loads
    expert_units = [u for u in rep.units if u.expert is not None]
    assert len(expert_units) > len(fused)
    assert all(len(threads[k]) == 2 for k in fused), threads  # each fused tensor's units ran on both workers
    serial = kappatune.scan(model, cache=False, workers=1)
    assert [(u.name, u.kappa) for u in rep.units] == [(u.name, u.kappa) for u in serial.units]


@pytest.mark.parametrize("arch", ["olmoe", "llama"])
def test_device_route_matches_cpu_routes(arch):
    """The batched float64 torch route (what runs on a GPU), run here on the CPU: same kappas and
    log-volumes as the CPU routes, same selection, the device recorded in the report."""
    model = make_model(arch)
    cpu = kappatune.scan(model, cache=False)
    dev = kappatune.scan(model, cache=False, device="torch:cpu")
    assert [u.name for u in dev.units] == [u.name for u in cpu.units]
    for a, b in zip(cpu.units, dev.units):
        assert b.kappa == pytest.approx(a.kappa, rel=1e-8), (a.name, a.method, b.method)
        assert b.log_volume == pytest.approx(a.log_volume, rel=1e-9, abs=1e-9)
        assert b.content_hash == a.content_hash
    assert dev.options["device"] == "torch:cpu" and cpu.options["device"] == "cpu"
    exact = kappatune.scan(model, cache=False, device="torch:cpu", exact=True)
    assert {u.method for u in exact.units} == {"svd"}
    for a, b in zip(cpu.units, exact.units):
        assert b.kappa == pytest.approx(a.kappa, rel=1e-8)


def test_device_route_batches_ill_conditioned_and_nonfinite():
    from kappatune.spectral import spectra_torch

    g = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(180, 180, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(300, 180, generator=g, dtype=torch.float64))
    ill = (u * torch.logspace(0, -6, 180, dtype=torch.float64)) @ v.T  # kappa 1e6: beyond the Gram's trust
    well = torch.randn(180, 300, generator=g, dtype=torch.float64)
    bad = well.clone()
    bad[3, 7] = float("nan")
    out = spectra_torch([ill, well, bad, ill.T.contiguous()], device="cpu", max_batch_bytes=1)  # batches of one
    same = spectra_torch([ill, well, bad, ill.T.contiguous()], device="cpu")  # one batch per shape
    for w, s, t in zip([ill, well, None, ill.T], out, same):
        assert s == t
        if w is None:
            assert s.status == "nonfinite"
            continue
        ref = np_kappa(w.numpy())
        assert s.kappa == pytest.approx(ref, rel=1e-6)
    assert out[0].method == "qr-svd" and out[1].method == "gram-eigh"


def test_device_option_errors():
    model = make_model("llama")
    with pytest.raises(kappatune.KappaTuneError, match="device"):
        kappatune.scan(model, cache=False, device="nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(kappatune.KappaTuneError, match="CUDA"):
            kappatune.scan(model, cache=False, device="cuda")


def test_cache_never_serves_one_route_for_another(tmp_path):
    """The spectrum cache key includes the route: a CPU-route spectrum is never returned for a device-route
    scan of the same weights, nor the reverse; each route hits its own entries."""
    model = make_model("llama")
    cache = str(tmp_path / "spectra")
    cpu = kappatune.scan(model, cache_dir=cache)
    dev = kappatune.scan(model, cache_dir=cache, device="torch:cpu")
    assert cpu.cache_hits == 0 and dev.cache_hits == 0
    assert {u.method for u in dev.units} <= {"gram-eigh", "qr-svd"}  # computed by the device route
    assert not {u.method for u in cpu.units} & {"qr-svd"}
    again_dev = kappatune.scan(model, cache_dir=cache, device="torch:cpu")
    again_cpu = kappatune.scan(model, cache_dir=cache)
    assert again_dev.cache_hits == len(dev.units) and again_cpu.cache_hits == len(cpu.units)
    assert [(u.kappa, u.method) for u in again_dev.units] == [(u.kappa, u.method) for u in dev.units]
    assert [(u.kappa, u.method) for u in again_cpu.units] == [(u.kappa, u.method) for u in cpu.units]
    exact = kappatune.scan(model, cache_dir=cache, exact=True)  # exact is part of the key too
    assert exact.cache_hits == 0 and {u.method for u in exact.units} == {"svd"}


def test_unit_result_takes_every_figure_from_its_spectrum():
    """One field list: a report unit built from a UnitSpec and a Spectrum carries every figure of the
    Spectrum that the report format has, and a failed unit carries NaN figures and the error."""
    import dataclasses

    from kappatune.report import UnitResult
    from kappatune.spectral import Spectrum
    from kappatune.units import UnitSpec

    spec = UnitSpec(name="m.experts.gate_up_proj@1.up", param="m.experts.gate_up_proj", source="m.experts.gate_up_proj",
                    layout="expert", kind="experts.up_proj", group="expert", layer=3, shape=(4, 8), expert=1,
                    half="up", source_slice=(1, 4, 8), param_rows=(4, 8))
    values = {f.name: float(i + 1) for i, f in enumerate(dataclasses.fields(Spectrum)) if f.type == "float"}
    s = Spectrum(**values, status="ok", method="gram-eigh")
    u = UnitResult.build(spec, "bfloat16", s, "abc")
    report_fields = {f.name for f in dataclasses.fields(UnitResult)}
    copied = [k for k in values if k in report_fields]
    assert len(copied) == 7 and set(values) - set(copied) == {"frobenius_sq"}
    assert all(getattr(u, k) == values[k] for k in copied)
    assert (u.status, u.method, u.content_hash, u.dtype) == ("ok", "gram-eigh", "abc", "bfloat16")
    assert (u.name, u.param, u.shape, u.numel, u.expert, u.half, u.param_rows, u.layer) == \
        (spec.name, spec.param, (4, 8), 32, 1, "up", (4, 8), 3)
    assert UnitResult.from_dict(u.to_dict()) == u
    bad = UnitResult.build(spec, "float32", None, message="boom")
    assert bad.status == "error" and bad.method == "none" and bad.message == "boom"
    assert all(math.isnan(getattr(bad, k)) for k in copied)


def test_tensor_hash_is_content_dtype_and_shape():
    from kappatune.hashing import tensor_hash

    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, generator=g)
    assert tensor_hash(a.T) == tensor_hash(a.T.contiguous())  # a non-contiguous view hashes like its copy
    assert tensor_hash(a) == tensor_hash(a.clone())
    assert tensor_hash(a) != tensor_hash(a.reshape(4, 6))  # same bytes, other shape
    assert tensor_hash(a) != tensor_hash(a.view(torch.int32))  # same bytes, other dtype
    b = a.to(torch.bfloat16)
    assert tensor_hash(b) == tensor_hash(b.clone()) != tensor_hash(b.to(torch.float16))
    fused = torch.randn(3, 8, 4, generator=g)
    assert tensor_hash(fused[1, 4:8]) == tensor_hash(fused[1, 4:8].clone())
    assert len(tensor_hash(a)) == 32  # XXH3-128, hex


def test_a_registered_source_is_opened_by_scan(tmp_path):
    """A new kind of input needs only a Source and its registration: here a 'zoo:NAME' id resolved to an
    in-memory model; its report equals the module's own."""
    from kappatune import sources
    from conftest import make_model

    model = make_model("llama")

    class ZooSource(sources.ModuleSource):
        kind = "zoo"

    def zoo(obj):
        return ZooSource(model)

    sources.register_source(lambda obj: isinstance(obj, str) and obj.startswith("zoo:"))(zoo)
    try:
        via_id = kappatune.scan("zoo:tiny-llama", cache=False)
    finally:
        sources.unregister_source(zoo)  # leave the registry as the other tests expect
    direct = kappatune.scan(model, cache=False)
    assert via_id.source["kind"] == "zoo"
    assert [(u.name, u.kappa) for u in via_id.units] == [(u.name, u.kappa) for u in direct.units]
    with pytest.raises(kappatune.KappaTuneError, match="no such file"):
        kappatune.scan("zoo:tiny-llama", cache=False)
