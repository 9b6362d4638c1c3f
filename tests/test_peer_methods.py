"""PEFT's forgetting-aware adapter methods (osf, corda-kpm, mica, pissa, dora) at kappatune's budget."""

import inspect
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from kappatune.errors import KappaTuneError
from kappatune.evaluate import control_chunks, control_forgetting, evaluate
from kappatune.hashing import tensor_hash
from kappatune.methods import METHODS, get_method
from kappatune.methods.corda_kpm import CordaKpmOptions, calibration_split
from kappatune.methods.lora import LORA_DEFAULT_TARGETS
from kappatune.train import TrainConfig, train
from conftest import char_tokenizer, make_lm, toy_rows

PEER_METHODS = ["osf", "corda-kpm", "mica", "pissa", "dora"]
BUDGET = 2700  # DoRA's count at 2700 is only closest when its magnitude vectors are paid for first
# what PEFT makes trainable for each method (every trainable parameter name contains one of these)
TRAINS = {"osf": ("osf_svd_params",), "mica": ("lora_A",), "pissa": ("lora_A", "lora_B"),
          "corda-kpm": ("lora_A", "lora_B"), "dora": ("lora_A", "lora_B", "lora_magnitude_vector")}


def _digests(model):
    return {n: tensor_hash(p) for n, p in model.named_parameters()}


def _targets(model):
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LORA_DEFAULT_TARGETS}


def _accounting(model, method):
    """(params per rank step, rank-independent params), from the target modules' shapes."""
    mods = _targets(model).values()
    if method == "mica":   # only A (r x d_in) trains
        return sum(m.in_features for m in mods), 0
    if method == "osf":    # U_low (d_out x t), S_low (t), V_low (t x d_in)
        return sum(m.in_features + m.out_features + 1 for m in mods), 0
    step = sum(m.in_features + m.out_features for m in mods)
    return step, (sum(m.out_features for m in mods) if method == "dora" else 0)


def _text(n_words, seed=0):
    rng = random.Random(seed)
    words = ["river", "stone", "market", "winter", "engine", "garden", "letter", "bridge", "cloud", "harbour"]
    return " ".join(rng.choice(words) for _ in range(n_words)) + "\n"


def _corda_options(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_text(800))
    tok_dir = tmp_path / "tok"
    char_tokenizer().save_pretrained(tok_dir)
    return {"corpus": str(corpus), "calib_chunks": "8", "chunk_len": "32", "eval_chunks": "4",
            "eval_chunk_len": "64", "tokenizer": str(tok_dir)}


class _OptimizerSpy(TrainerCallback):
    def on_train_end(self, args, state, control, optimizer=None, **kw):
        self.numel = sum(p.numel() for g in optimizer.param_groups for p in g["params"])


def test_peer_methods_are_registered_adapters():
    for name in PEER_METHODS:
        m = get_method(name)
        assert m.family == "adapter" and m.needs_budget and m.help and "\n" not in m.help


@pytest.mark.parametrize("method", PEER_METHODS)
def test_peer_method_changes_only_adapted_weights_at_budget(method, tmp_path):
    model, tok = make_lm()
    before = _digests(model)
    adapted = sorted(f"{n}.weight" for n in _targets(model))
    step, fixed = _accounting(model, method)
    opts = _corda_options(tmp_path) if method == "corda-kpm" else {}
    spy = _OptimizerSpy()
    cfg = TrainConfig(method=method, budget_params=BUDGET, epochs=2, batch_size=4, lr=5e-3, weight_decay=0.1,
                      save_steps=100, progress=False, logging_steps=2, method_options=opts)
    res = train(model, tok, toy_rows(), str(tmp_path / "out"), cfg, extra_callbacks=[spy])
    assert res.frozen_verified

    # budget: a whole number of rank steps (+ DoRA's magnitudes), within one step of the budget, all in AdamW
    assert (res.trainable_params - fixed) % step == 0
    assert (res.trainable_params - fixed) // step == res.info["rank"] >= 1
    assert abs(res.trainable_params - BUDGET) <= step / 2  # the closest count on offer: within one step, too
    assert spy.numel == res.trainable_params
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    names = manifest["trainable"]["trainable_names"]
    assert names and all(any(k in n for k in TRAINS[method]) for n in names)
    assert {k for k in TRAINS[method] if any(k in n for n in names)} == set(TRAINS[method])

    # the saved model is plain (no adapter tensors) and only the adapted weights moved, all of them
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    after = _digests(final)
    assert sorted(after) == sorted(before)
    changed = sorted(n for n in before if before[n] != after[n])
    assert changed == adapted
    assert sorted(c["name"] for c in manifest["changed"]) == changed
    assert manifest["unchanged_count"] == len(before) - len(adapted)
    assert (tmp_path / "out" / "adapter").is_dir()


def test_corda_kpm_calibrates_from_the_corpus_end(tmp_path):
    model, tok = make_lm()
    opts = _corda_options(tmp_path)
    cfg = TrainConfig(method="corda-kpm", budget_params=BUDGET, max_steps=1, batch_size=4, save_steps=100,
                      progress=False, method_options=opts)
    res = train(model, tok, toy_rows(8), str(tmp_path / "out"), cfg)
    corda = res.info["corda"]
    n_tokens = len(tok((tmp_path / "corpus.txt").read_text(), add_special_tokens=False)["input_ids"])
    assert corda["mode"] == "kpm" and corda["calib_chunks"] == 8
    assert corda["calib_tokens"] == [n_tokens - 8 * 32, n_tokens]
    assert corda["reserved_eval_tokens"] == 4 * 64 <= corda["calib_tokens"][0]


def test_corda_calibration_and_evaluation_chunks_are_disjoint():
    tok = char_tokenizer()
    text = _text(600)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    split = calibration_split(tok, text, calib_chunks=10, chunk_len=48, eval_chunks=8, eval_chunk_len=64)
    evaluation = control_chunks(tok, text, 64, 8)
    eval_positions = set(range(8 * 64))
    assert [t for c in evaluation for t in c] == ids[:split.eval_end] and split.eval_end == 8 * 64
    calib_positions = set(range(split.start, split.end))
    assert split.end == len(ids) and len(calib_positions) == 10 * 48
    assert not calib_positions & eval_positions
    assert split.chunks == [ids[split.start + i * 48: split.start + (i + 1) * 48] for i in range(10)]
    # the char tokenizer maps one character to one token: the calibration text is the corpus' tail only
    assert "".join(tok.convert_ids_to_tokens([t for c in split.chunks for t in c])) == text[split.start:]


def test_corda_calibration_refuses_to_overlap_the_evaluation_chunks():
    tok = char_tokenizer()
    text = _text(200)  # ~1,300 characters
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    with pytest.raises(KappaTuneError, match="overlap"):
        calibration_split(tok, text, calib_chunks=n // 32, chunk_len=32, eval_chunks=4, eval_chunk_len=64)
    ok = calibration_split(tok, text, calib_chunks=(n - 256) // 32, chunk_len=32, eval_chunks=4, eval_chunk_len=64)
    assert ok.start >= ok.eval_end == 256


def test_corda_default_reserve_covers_kappatunes_evaluation_defaults():
    opts = CordaKpmOptions.__dataclass_fields__
    reserved = opts["eval_chunks"].default * opts["eval_chunk_len"].default
    for fn in (evaluate, control_forgetting):
        sig = inspect.signature(fn).parameters
        assert sig["max_chunks"].default * sig["chunk_len"].default <= reserved


def test_corda_without_covariance_data_fails_when_the_config_is_built(tmp_path):
    with pytest.raises(KappaTuneError) as e:
        TrainConfig(method="corda-kpm")
    assert "covariance" in str(e.value) and "corpus=" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(KappaTuneError, match="existing text file"):
        TrainConfig(method="corda-kpm", method_options={"corpus": str(tmp_path / "missing.txt")})
    with pytest.raises(KappaTuneError, match="calib_chunks"):
        TrainConfig(method="corda-kpm", method_options={**_corda_options(tmp_path), "calib_chunks": "0"})


def test_unknown_method_option_is_refused(tmp_path):
    with pytest.raises(KappaTuneError, match="has no option 'rank'"):
        TrainConfig(method="corda-kpm", method_options={**_corda_options(tmp_path), "rank": "4"})
    for name in ("osf", "mica", "pissa", "dora"):
        with pytest.raises(KappaTuneError, match="takes no method options"):
            TrainConfig(method=name, method_options={"rank": "4"})
    assert set(PEER_METHODS) <= set(METHODS)


def test_corda_decomposition_is_cached_and_reused_bit_for_bit(tmp_path):
    """A second corda-kpm run on the same weights, calibration chunks and rank (another learning rate or seed in
    the lab) loads CorDA's decomposition instead of running the covariance pass, and starts from the very same
    adapter; other weights miss the cache."""
    from kappatune.methods import MethodContext, get_method

    opts = _corda_options(tmp_path)
    cfg = TrainConfig(method="corda-kpm", budget_params=BUDGET, progress=False, method_options=opts)

    def prepared(seed):
        model, tok = make_lm(seed=seed)
        calls = []
        model.register_forward_hook(lambda *a: calls.append(1))
        prep = get_method("corda-kpm").prepare(model, MethodContext(lambda: None, tok), cfg)
        return prep, len(calls)

    first, forwards = prepared(0)
    again, forwards_again = prepared(0)
    assert forwards == 8 and forwards_again == 0
    assert not first.info["corda"]["decomposition_cached"] and again.info["corda"]["decomposition_cached"]
    a, b = dict(first.model.named_parameters()), dict(again.model.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    other, forwards_other = prepared(1)
    assert forwards_other == 8 and not other.info["corda"]["decomposition_cached"]
    assert len(list((tmp_path / "kt-corda-cache").glob("*.pt"))) == 2
    assert not list((tmp_path / "kt-corda-cache").glob("*.tmp"))


@pytest.mark.parametrize("method", ["osf", "lora"])
def test_kappa_monitor_follows_the_merged_weight_of_peft_layers(method):
    """The monitor reads W + delta of each adapted layer (OSF's factors are orthonormal, kappa 1: following
    them would say nothing about the weight); at initialisation the delta is 0, so the base weights come back,
    and after a change of the adapter the merged weight follows PEFT's own get_delta_weight."""
    from kappatune.methods import MethodContext, get_method
    from kappatune.monitor import trained_matrices

    model, tok = make_lm()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = {f"{n}.weight" for n in _targets(model)}
    prep = get_method(method).prepare(model, MethodContext(lambda: None, tok),
                                      TrainConfig(method=method, budget_params=BUDGET, progress=False))
    mats = trained_matrices(prep.model)
    assert mats and set(mats) == targets
    for n, w in mats.items():
        assert torch.allclose(w, original[n], atol=1e-5), n
    with torch.no_grad():
        for p in prep.model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    moved = trained_matrices(prep.model)
    assert any(not torch.allclose(moved[n], original[n], atol=1e-5) for n in moved)
