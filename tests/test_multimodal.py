"""Algorithm 2 pieces: adaptor shapes and subsampling, exact label alignment, and a training step in which
only the adaptor and the selected LLM tensors change."""

import pytest
import torch

import kappatune
from kappatune.hashing import tensor_hash as tensor_digest
from kappatune.multimodal import SpeechAdaptor, SpeechLLM, build_inputs, word_error_rates
from conftest import make_lm


def test_adaptor_subsamples_by_concatenation():
    torch.manual_seed(0)
    ad = SpeechAdaptor(6, 16, subsample=4, heads=4, layers=2)
    x = torch.randn(2, 10, 6)
    y, lens = ad(x, torch.tensor([10, 7]))
    assert y.shape == (2, 3, 16) and lens.tolist() == [3, 2]
    # the projection sees 4 adjacent frames concatenated: frame block 0 = frames 0..3 flattened
    with torch.no_grad():
        ad.blocks = torch.nn.ModuleList()  # isolate the concat + projection + norm + PE stage
        y, _ = ad(x)
        from kappatune.multimodal.adaptor import sinusoidal_positions

        want = ad.norm(ad.proj(x[0, 0:4].reshape(-1))) + sinusoidal_positions(3, 16)[0]
        assert torch.allclose(y[0, 0], want, atol=1e-6)
        # the last block is zero-padded: frames 8, 9 then two zero frames
        pad = torch.cat([x[0, 8:10], torch.zeros(2, 6)]).reshape(-1)
        assert torch.allclose(y[0, 2], ad.norm(ad.proj(pad)) + sinusoidal_positions(3, 16)[2], atol=1e-6)
    assert sum(p.numel() for p in ad.proj.parameters()) == 4 * 6 * 16 + 16


def test_padding_does_not_leak_into_valid_frames():
    torch.manual_seed(0)
    ad = SpeechAdaptor(4, 8, subsample=2, heads=2, layers=2).eval()
    x = torch.randn(1, 6, 4)
    a, _ = ad(x, torch.tensor([6]))
    x2 = torch.cat([x, torch.randn(1, 4, 4) * 100], dim=1)  # junk padding appended
    b, lens = ad(x2, torch.tensor([6]))
    assert lens.tolist() == [3]
    assert torch.allclose(a[0, :3], b[0, :3], atol=1e-5)


def test_label_alignment_exact_positions():
    emb = torch.nn.Embedding(20, 3)
    audio = torch.randn(2, 4, 3)
    emb_out, att, lab = build_inputs(audio, torch.tensor([4, 2]), [[5, 6, 7], [8]], emb, bos_id=1, eos_id=2)
    # sample 0: 4 audio + BOS + 3 text + EOS = 9; sample 1: 2 audio + BOS + 1 text + EOS = 5
    assert emb_out.shape == (2, 9, 3)
    assert att.tolist() == [[1] * 9, [1] * 5 + [0] * 4]
    assert lab.tolist() == [[-100, -100, -100, -100, -100, 5, 6, 7, 2],
                            [-100, -100, -100, 8, 2, -100, -100, -100, -100]]
    assert torch.equal(emb_out[0, :4], audio[0]) and torch.equal(emb_out[1, :2], audio[1, :2])
    assert torch.allclose(emb_out[0, 4], emb(torch.tensor(1)))  # BOS right after the audio
    assert torch.allclose(emb_out[1, 3], emb(torch.tensor(8)))
    assert torch.equal(emb_out[1, 5:], torch.zeros(4, 3))


def _tiny_encoder():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
                        max_source_positions=20, vocab_size=50, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1)
    torch.manual_seed(0)
    return WhisperEncoder(cfg)


def test_training_step_changes_only_adaptor_and_selected_llm_tensors():
    enc = _tiny_encoder()
    llm, tok = make_lm("llama")
    sel = kappatune.select(kappatune.scan(llm, cache=False), count=2)
    kappatune.apply(llm, sel)
    model = SpeechLLM(enc, llm, subsample=4, heads=4, layers=2)
    before = {n: tensor_digest(p) for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    feats = torch.randn(2, 8, 40)  # (B, mel bins, 2 * max_source_positions)
    texts = [tok("hi there", add_special_tokens=False)["input_ids"], tok("ok", add_special_tokens=False)["input_ids"]]
    for _ in range(2):
        loss = model(feats, torch.tensor([40, 16]), texts, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = {n: tensor_digest(p) for n, p in model.named_parameters()}
    changed = {n for n in before if before[n] != after[n]}
    expected_llm = {f"llm.{n}" for n in sel.names}
    assert expected_llm <= changed
    assert all(n.startswith("adaptor.") or n in expected_llm for n in changed)
    assert any(n.startswith("adaptor.") for n in changed)
    assert not any(n.startswith("encoder.") for n in changed)
    out = model.transcribe(feats[:1], torch.tensor([40]), tok.bos_token_id, tok.eos_token_id, max_new_tokens=5)
    assert len(out) == 1 and len(out[0]) <= 5


def test_word_error_rates():
    r = word_error_rates(["the cat sat", "hello"], ["the cat sit", "hello"])
    assert r["wer"] == pytest.approx(1 / 4) and 0 < r["cer"] < 0.2


def _wav_manifest(tmp_path, texts, name="m.jsonl", seconds=0.4, rate=16000, freqs=None):
    """Tones of ``seconds`` as WAV clips (the tiny encoder's window is 0.4 s: 20 positions x 2 x 10 ms); clip i
    at ``freqs[i]`` Hz (default 200 + 150 i: close tones, which 8 mel bins barely tell apart)."""
    import json
    import wave

    import numpy as np

    rows = []
    for i, text in enumerate(texts):
        t = np.arange(int(rate * seconds)) / rate
        hz = freqs[i] if freqs else 200 + 150 * i
        pcm = (0.3 * np.sin(2 * np.pi * hz * t) * 32767).astype("<i2")
        p = tmp_path / f"{name}-{i}.wav"
        with wave.open(str(p), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(pcm.tobytes())
        rows.append({"audio": p.name, "text": text})
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / name


def _speech_setup(seed=0, ctc_weight=0.0):
    enc = _tiny_encoder()
    llm, tok = make_lm("llama", seed=seed)
    kappatune.apply(llm, kappatune.select(kappatune.scan(llm, cache=False), count=2))
    return SpeechLLM(enc, llm, subsample=4, heads=4, layers=2, ctc_weight=ctc_weight), tok


def test_train_speech_recipe_end_to_end(tmp_path):
    """Manifest of real WAV files -> features -> Trainer steps -> model/ with adaptor + LLM; WER reported."""
    from safetensors.torch import load_file
    from transformers import WhisperFeatureExtractor

    from kappatune.multimodal.speech_train import SpeechTrainConfig, load_manifest, load_speech_model, train_speech

    manifest = load_manifest(str(_wav_manifest(tmp_path, ["go left", "go right", "stop now", "go left"])))
    model, tok = _speech_setup()
    fe = WhisperFeatureExtractor(feature_size=8)
    res = train_speech(model, tok, fe, manifest, manifest[:2], str(tmp_path / "out"),
                       SpeechTrainConfig(epochs=2, batch_size=2, lr=1e-2, eval_every=2, logging_steps=1),
                       n_frames=40, control_text="plain words about the world. " * 60)
    assert res["frozen_verified"] and res["steps"] == 4 and 0 <= res["final"]["wer"]
    # evaluations before training and every 2 steps, each with WER and the control perplexity
    assert [h["step"] for h in res["history"]] == [0, 2, 4]
    assert res["history"][0]["dppl"] == 0 and all("wer" in h and "control_ppl" in h for h in res["history"])
    assert all(h["audio_gap"] == pytest.approx(h["loss_wrong_audio"] - h["loss_right_audio"]) for h in res["history"])
    assert [x["step"] for x in res["losses"]] == [1, 2, 3, 4]
    # only the adaptor and the 2 selected LLM tensors moved
    assert res["trainable"]["llm_tensors"] == 2
    out = tmp_path / "out" / "model"
    assert (out / "adaptor.safetensors").exists() and (out / "llm" / "config.json").exists()
    # the saved folder reloads into a model with the same adaptor and the same transcripts
    again, tok2, cfg = load_speech_model(str(out), _tiny_encoder())
    sd = load_file(str(out / "adaptor.safetensors"))
    assert all(torch.equal(sd[k], v) for k, v in again.adaptor.state_dict().items())
    from kappatune.multimodal.speech_train import evaluate_speech

    ev = evaluate_speech(again, tok2, manifest[:2], fe, 40)
    assert ev["wer"] == pytest.approx(res["final"]["wer"]) and ev["cer"] == pytest.approx(res["final"]["cer"])


@pytest.mark.parametrize("ctc_weight", [0.0, 0.5])
def test_train_speech_resume_is_exact(tmp_path, ctc_weight):
    """Stopping after 2 of 4 steps and rerunning gives bit-identical adaptor and LLM weights (with the auxiliary
    CTC head too: it is in the checkpoints, and left out of the final model/)."""
    from safetensors.torch import load_file
    from transformers import WhisperFeatureExtractor

    from kappatune.multimodal.speech_train import SpeechTrainConfig, load_manifest, train_speech

    manifest = load_manifest(str(_wav_manifest(tmp_path, ["go left", "go right", "stop now", "go up", "halt"])))
    fe = WhisperFeatureExtractor(feature_size=8)

    def run(out, max_steps):
        model, tok = _speech_setup(ctc_weight=ctc_weight)
        cfg = SpeechTrainConfig(max_steps=max_steps, batch_size=2, lr=1e-2, adaptor_lr=3e-3, scheduler="constant",
                                save_steps=2, weight_decay=0.1, ctc_weight=ctc_weight,
                                ctc_steps=5 if ctc_weight else 0)  # with CTC: a CTC-only first stage too
        res = train_speech(model, tok, fe, manifest, [], str(out), cfg, n_frames=40)
        assert (res["ctc_stage"] is not None and res["ctc_stage"]["steps"] == 5) == (ctc_weight > 0)
        return model

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-2" / "adaptor.safetensors").exists()
    ckpt = load_file(str(tmp_path / "b" / "checkpoints" / "checkpoint-2" / "adaptor.safetensors"))
    resumed = run(tmp_path / "b", 4)  # resumes from checkpoint-2
    sa, sb = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    a = load_file(str(tmp_path / "a" / "model" / "adaptor.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "adaptor.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and it did train: the adaptor differs from a fresh one
    fresh, _ = _speech_setup()
    assert not all(torch.equal(fresh.adaptor.state_dict()[k], a[k]) for k in a)
    assert any(k.startswith("ctc_head.") for k in ckpt) == (ctc_weight > 0)
    assert not any(k.startswith("ctc_head.") for k in a)
    if ctc_weight:  # the head trained, and the saved model reloads without it
        assert not torch.equal(fresh_head(ctc_weight)["ctc_head.proj.weight"], sb["adaptor.ctc_head.proj.weight"])
        from kappatune.multimodal.speech_train import load_speech_model

        again, _, cfg = load_speech_model(str(tmp_path / "b" / "model"), _tiny_encoder())
        assert again.adaptor.ctc_head is None and cfg["ctc_weight"] == 0.0


def fresh_head(ctc_weight):
    return _speech_setup(ctc_weight=ctc_weight)[0].adaptor.state_dict()


def test_ctc_targets_and_loss_reach_the_adaptor_outputs():
    """char_targets: lower case, spoken symbols only, single spaces; the model's loss with char_ids is the LM
    loss plus ctc_weight x the CTC loss, whose gradient reaches the adaptor's projection."""
    from kappatune.multimodal.ctc import CHARS, char_targets

    assert "".join(CHARS[i - 1] for i in char_targets("  Hello,  World! It's 42. ")) == "hello world it's 42"
    model, tok = _speech_setup(ctc_weight=0.5)
    torch.manual_seed(0)
    frames = [torch.randn(12, 16), torch.randn(8, 16)]
    texts = ["go left", "stop"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    chars = [char_targets(t) for t in texts]
    plain = model.forward_frames(frames, ids, tok.bos_token_id, tok.eos_token_id).loss
    both = model.forward_frames(frames, ids, tok.bos_token_id, tok.eos_token_id, char_ids=chars).loss
    lens = torch.tensor([12, 8])
    audio, alens = model.adaptor(torch.nn.utils.rnn.pad_sequence(frames, batch_first=True), lens)
    ctc = model.adaptor.ctc_head.loss(audio, alens, chars)
    assert both.item() == pytest.approx(plain.item() + 0.5 * ctc.item(), rel=1e-5) and ctc.item() > 0
    model.adaptor.proj.weight.grad = None
    ctc.backward()
    assert model.adaptor.proj.weight.grad.abs().sum() > 0


def test_ctc_loss_matches_a_hand_count_of_alignments():
    """With a zero head every CTC frame is uniform over the 39 symbols, so the loss is -log(number of valid
    alignments / 39^T) divided by the target length (reduction 'mean'). 'ab' over T=3 frames has 5 alignments
    (aab, abb, _ab, a_b, ab_); 'a' over T=2 has 3 (aa, _a, a_); text longer than the frames costs 0, not inf."""
    import math

    from kappatune.multimodal.ctc import CTC_VOCAB, CharCTCHead, char_targets

    assert CTC_VOCAB == 39
    head = CharCTCHead(4, per_position=1)
    torch.nn.init.zeros_(head.proj.weight)
    torch.nn.init.zeros_(head.proj.bias)
    x = torch.randn(1, 3, 4)
    want_ab = -math.log(5 / 39 ** 3) / 2
    got = head.loss(x, torch.tensor([3]), [char_targets("ab")])
    assert got.item() == pytest.approx(want_ab, rel=1e-5)
    head2 = CharCTCHead(4, per_position=2)  # one adaptor position = 2 CTC frames
    torch.nn.init.zeros_(head2.proj.weight)
    torch.nn.init.zeros_(head2.proj.bias)
    got = head2.loss(torch.randn(1, 1, 4), torch.tensor([1]), [char_targets("a")])
    assert got.item() == pytest.approx(-math.log(3 / 39 ** 2), rel=1e-5)
    # a batch: the mean of the per-clip losses, each divided by its target length; "abcd" cannot fit 1 frame
    both = head.loss(torch.randn(2, 3, 4), torch.tensor([3, 1]), [char_targets("ab"), char_targets("abcd")])
    assert both.item() == pytest.approx((want_ab + 0.0) / 2, rel=1e-5)


def test_adaptor_output_norm_starts_at_the_llm_embedding_scale():
    """--adaptor-out-norm: outputs have the LLM's token-embedding RMS at initialisation (the paper's adaptor is
    ~sqrt(dim) / that larger), whatever the input scale; subsample 8 halves the positions of 4."""
    from kappatune.multimodal.model import embedding_rms

    enc = _tiny_encoder()
    llm, _ = make_lm("llama")
    rms = embedding_rms(llm)
    w = llm.get_input_embeddings().weight.detach()
    assert rms == pytest.approx(float(w.pow(2).mean().sqrt()), rel=1e-6)
    torch.manual_seed(0)
    frames = [torch.randn(16, 16) * 50, torch.randn(9, 16)]
    lens = torch.tensor([16, 9])
    padded = torch.nn.utils.rnn.pad_sequence(frames, batch_first=True)
    plain = SpeechLLM(enc, llm, subsample=4, heads=4, layers=2)
    normed = SpeechLLM(enc, llm, subsample=8, heads=4, layers=2, out_norm=True)
    a, alens = plain.adaptor(padded, lens)
    b, blens = normed.adaptor(padded, lens)
    assert a.shape[1] == 4 and b.shape[1] == 2 and alens.tolist() == [4, 3] and blens.tolist() == [2, 2]
    out_rms = b[0].pow(2).mean(-1).sqrt()
    assert torch.allclose(out_rms, torch.full_like(out_rms, rms), rtol=1e-3)
    assert a[0].pow(2).mean(-1).sqrt().min() > 3 * rms  # the plain adaptor is far off the embedding scale
    assert normed.adaptor.out_norm.weight.requires_grad


def test_saved_speech_model_keeps_subsample_and_output_norm(tmp_path):
    from kappatune.multimodal.speech_train import load_speech_model, save_speech_model

    enc = _tiny_encoder()
    llm, tok = make_lm("llama")
    torch.manual_seed(1)
    model = SpeechLLM(enc, llm, subsample=8, heads=4, layers=1, out_norm=True)
    with torch.no_grad():
        model.adaptor.out_norm.weight.mul_(1.5)  # a trained gain
    save_speech_model(model, tok, str(tmp_path / "m"))
    again, _, cfg = load_speech_model(str(tmp_path / "m"), enc)
    assert cfg["subsample"] == 8 and cfg["out_norm"] is True and again.adaptor.subsample == 8
    x = torch.randn(1, 16, 16)
    assert torch.equal(again.adaptor(x)[0], model.adaptor(x)[0])


def _letter_clips(n=24, seed=0):
    """Clips whose frames spell their text: each letter is 4 frames of that letter's own vector plus noise."""
    import random

    from kappatune.multimodal.ctc import char_targets

    g = torch.Generator().manual_seed(seed)
    vec = {c: torch.randn(8, generator=g) * 2 for c in "abc"}
    rng = random.Random(seed)
    texts = []
    for _ in range(n):  # no letter twice in a row: identical frames carry no boundary to count repeats by
        t = rng.choice("abc")
        while len(t) < rng.randint(2, 5):
            t += rng.choice([c for c in "abc" if c != t[-1]])
        texts.append(t)
    frames = [torch.stack([vec[c] for c in t for _ in range(4)]) + 0.1 * torch.randn(4 * len(t), 8, generator=g)
              for t in texts]
    return frames, [char_targets(t) for t in texts]


def test_ctc_stage_learns_the_letters_and_runs_once_per_output(tmp_path):
    from kappatune.multimodal.ctc_stage import STAGE_RECORD, ctc_pretrain, run_ctc_stage

    frames, chars = _letter_clips()

    def ctc_loss(ad):
        padded = torch.nn.utils.rnn.pad_sequence(frames, batch_first=True)
        with torch.no_grad():
            out, lens = ad(padded, torch.tensor([f.shape[0] for f in frames]))
            return float(ad.ctc_head.loss(out, lens, chars))

    torch.manual_seed(0)
    ad = SpeechAdaptor(8, 16, subsample=2, heads=2, layers=1, ctc_head=True)
    before = ctc_loss(ad)
    hist = ctc_pretrain(ad, frames, chars, steps=300, lr=1e-2, batch_size=4, seed=0, log_every=100)
    assert [h["step"] for h in hist] == [100, 200, 300]
    assert ctc_loss(ad) < 0.3 * before
    # run_ctc_stage: trained and saved once; a second call loads the saved adaptor instead of training
    torch.manual_seed(0)
    first = SpeechAdaptor(8, 16, subsample=2, heads=2, layers=1, ctc_head=True)
    rec = run_ctc_stage(first, frames, chars, str(tmp_path), steps=20, lr=3e-3, batch_size=4, seed=0)
    assert (tmp_path / STAGE_RECORD).exists() and rec["steps"] == 20
    torch.manual_seed(0)
    second = SpeechAdaptor(8, 16, subsample=2, heads=2, layers=1, ctc_head=True)
    again = run_ctc_stage(second, frames, chars, str(tmp_path), steps=20, lr=3e-3, batch_size=4, seed=0)
    assert again == rec
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    # the trained head reads the letters back (best path: repeats merged, blanks dropped)
    from kappatune.multimodal.ctc import CHARS

    ad.eval()
    out, lens = ad(torch.nn.utils.rnn.pad_sequence(frames, batch_first=True),
                   torch.tensor([f.shape[0] for f in frames]))
    texts = ["".join(CHARS[c - 1] for c in t) for t in chars]
    hyps = ad.ctc_head.greedy(out, lens)
    assert word_error_rates(texts, hyps)["cer"] < 0.1
    from kappatune.multimodal.speech_train import ctc_reading

    right = ctc_reading(ad, frames, [t.upper() + "!" for t in texts])  # references are normalised
    wrong = ctc_reading(ad, frames, texts[1:] + texts[:1])
    assert right["cer"] < 0.1 and wrong["cer"] > 0.3 and right["wer"] < wrong["wer"]
    # a probe along the stage (here of six training clips; train-speech reads the held-out ones): its curve in
    # the history, and the same trained weights as without it, even for a probe that draws from the global RNG
    # and leaves the adaptor in eval mode (the stage forks the RNG and restores training mode; with dropout
    # either would otherwise change every later step)
    probe_frames, probe_texts = frames[:6], texts[:6]
    runs = {}
    for probing in (False, True):
        torch.manual_seed(0)
        a = SpeechAdaptor(8, 16, subsample=2, heads=2, layers=1, dropout=0.1, ctc_head=True)

        def probe(a=a):
            torch.rand(3)
            r = ctc_reading(a, probe_frames, probe_texts)
            a.eval()
            return {"heldout_ctc_cer": r["cer"], "heldout_ctc_wer": r["wer"]}

        hist = ctc_pretrain(a, frames, chars, steps=250, lr=1e-2, batch_size=4, seed=0, log_every=50,
                            probe=probe if probing else None, probe_every=100)
        runs[probing] = (a, hist)
    plain, probed = runs[False], runs[True]
    assert all(torch.equal(x, y) for x, y in zip(plain[0].state_dict().values(), probed[0].state_dict().values()))
    curve = [(h["step"], h["heldout_ctc_cer"]) for h in probed[1] if "heldout_ctc_cer" in h]
    assert [s for s, _ in curve] == [100, 200, 250] and curve[-1][1] < curve[0][1]
    assert all(h["probe_s"] >= 0 for h in probed[1] if "heldout_ctc_cer" in h)
    assert all("heldout_ctc_cer" not in h for h in plain[1]) and [h["ctc_loss"] for h in plain[1]] == \
        [h["ctc_loss"] for h in probed[1]]
    with pytest.raises(ValueError, match="multiple of log_every"):
        ctc_pretrain(a, frames, chars, steps=10, lr=1e-3, batch_size=2, seed=0, log_every=50, probe=probe,
                     probe_every=75)
    with pytest.raises(ValueError):
        ctc_pretrain(SpeechAdaptor(8, 16, subsample=2, heads=2, layers=1), frames, chars, steps=1, lr=1e-3,
                     batch_size=2, seed=0)


def test_ctc_stage_only_saves_a_stage_other_runs_start_from(tmp_path, lm_folder):
    """--ctc-stage-only trains and saves the stage, then stops before the LLM (no model/, no LLM evaluation);
    an arm started from it reads the held-out clips exactly as the stage's last reading did."""
    import json

    from transformers import WhisperModel

    from conftest import one_line_error, run

    enc_dir = tmp_path / "whisper"
    WhisperModel(_tiny_encoder().config).save_pretrained(enc_dir)
    train = _wav_manifest(tmp_path, ["go left", "go right", "stop now", "go left"], "train.jsonl")
    test = _wav_manifest(tmp_path, ["go left", "stop"], "test.jsonl")
    common = ["train-speech", str(lm_folder), "--manifest", str(train), "--test", str(test), "--encoder",
              str(enc_dir), "--batch-size", "2", "--adaptor-heads", "4"]
    stage = tmp_path / "stage"
    r = run(*common, "--ctc-stage-only", "--ctc-steps", "4", "-o", str(stage))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["stage_only"] and res["steps"] == 0 and res["ctc_stage"]["steps"] == 4
    assert res["meta"]["order"] == "none" and res["frozen_verified"]
    assert 0 < res["changed_tensors"]  # the adaptor and its head moved, nothing else (checked by the run)
    assert (stage / "ctc_stage.json").exists() and (stage / "ctc_stage.safetensors").exists()
    assert not (stage / "model").exists() and not (stage / "speech_eval_step0.json").exists()
    last = res["ctc_stage"]["history"][-1]
    # scripts/speech_oracle_probe.py --head reads the clips through the same stage: the same reading
    from conftest import load_script

    from kappatune.multimodal.ctc import char_targets, char_text
    from kappatune.multimodal.model import word_error_rates

    from kappatune.models import load_model

    (reads,) = load_script("speech_oracle_probe").head_readings(str(stage), load_model(str(lm_folder))[0], [str(test)])
    wanted = [char_text(char_targets(t)) for t in ("go left", "stop")]
    assert word_error_rates(wanted, [char_text(r) for r in reads])["cer"] == pytest.approx(last["heldout_ctc_cer"])
    r = run(*common, "--ctc-stage-from", str(stage), "--budget-params", "0", "--max-steps", "1", "--control",
            "none", "-o", str(tmp_path / "arm"))
    assert r.returncode == 0, r.stderr
    step0 = json.loads((tmp_path / "arm" / "speech_eval_step0.json").read_text())
    assert step0["ctc_cer"] == pytest.approx(last["heldout_ctc_cer"])
    one_line_error(run(*common, "--ctc-stage-only", "--ctc-stage-from", str(stage), "-o", str(tmp_path / "o5")),
                   "ctc_stage_only trains a CTC stage")
    assert not (tmp_path / "o5").exists()
    from kappatune.errors import KappaTuneError
    from kappatune.multimodal.speech_train import SpeechTrainConfig

    with pytest.raises(KappaTuneError, match="needs ctc_steps > 0"):
        SpeechTrainConfig(ctc_stage_only=True, ctc_weight=1.0)


def test_train_and_eval_speech_cli(tmp_path, lm_folder):
    """kappatune train-speech then eval-speech through the entry point; eval reproduces the final WER."""
    import json

    from transformers import WhisperModel

    from conftest import one_line_error, run

    enc_dir = tmp_path / "whisper"
    WhisperModel(_tiny_encoder().config).save_pretrained(enc_dir)
    train = _wav_manifest(tmp_path, ["go left", "go right", "stop now", "go left"], "train.jsonl")
    test = _wav_manifest(tmp_path, ["go left", "stop"], "test.jsonl")
    wiki = tmp_path / "wiki.txt"
    wiki.write_text("plain words about many things in the world. " * 80)
    out = tmp_path / "out"
    r = run("train-speech", str(lm_folder), "--manifest", str(train), "--test", str(test), "--encoder", str(enc_dir),
            "--order", "highest", "--budget-params", "5k", "--max-steps", "3", "--batch-size", "2", "--lr", "1e-2",
            "--control", str(wiki), "--adaptor-heads", "4", "--adaptor-subsample", "8", "--adaptor-out-norm",
            "--ctc-weight", "0.5", "--ctc-steps", "4", "--recipe", "paper", "-o", str(out))
    assert r.returncode == 0, r.stderr
    saved = json.loads((out / "model" / "adaptor.json").read_text())
    assert saved["subsample"] == 8 and saved["out_norm"] is True and saved["ctc_weight"] == 0.0  # head dropped
    res = json.loads(r.stdout)
    assert res["ctc_stage"]["steps"] == 4 and 0 <= res["final"]["ctc_cer"] <= 5 and "ctc_wer" in res["final"]
    last = res["ctc_stage"]["history"][-1]  # the stage's held-out reading, at its last step here
    assert last["step"] == 4 and 0 <= last["heldout_ctc_cer"] <= 5 and last["heldout_ctc_wer"] >= 0
    sel = json.loads((out / "selection.json").read_text())
    assert res["steps"] == 3 and res["frozen_verified"] and 0 < res["trainable"]["llm"] <= 5000
    # one encoder folder, one shard: the train clips' four tones; the test clips are the same first two tones
    # (the same bytes), so their frames came from the cache
    from safetensors import safe_open

    (folder,) = (tmp_path / "kt-speech-cache").glob("clips-*")
    (shard,) = folder.glob("*.safetensors")
    with safe_open(str(shard), framework="pt") as f:
        assert len(list(f.keys())) == 4
    assert sel["policy"]["order"] == "highest" and res["meta"]["order"] == "highest"
    r = run("eval-speech", str(out), "--manifest", str(test), "--control", str(wiki), "--base", str(lm_folder),
            "-o", str(tmp_path / "ev.json"))
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["wer"] == pytest.approx(res["final"]["wer"]) and ev["clips"] == 2
    assert ev["dppl"] == pytest.approx(res["final"]["dppl"], abs=1e-6)
    assert len(json.loads((tmp_path / "ev.json").read_text())["transcripts"]) == 2
    # another arm starts from that run's CTC stage: the same starting adaptor, so the same step-0 CTC reading
    common = ["train-speech", str(lm_folder), "--manifest", str(train), "--test", str(test), "--encoder",
              str(enc_dir), "--max-steps", "1", "--batch-size", "2", "--control", "none", "--adaptor-heads", "4",
              "--recipe", "paper", "--adaptor-out-norm", "--budget-params", "0", "--ctc-weight", "0.5",
              "--ctc-stage-from", str(out)]
    r = run(*common, "--adaptor-subsample", "8", "--adaptor-bridge", "chars", "-o", str(tmp_path / "arm"))
    assert r.returncode == 0, r.stderr
    arm = json.loads(r.stdout)
    assert arm["ctc_stage"]["source"] == str(out) and arm["ctc_stage"]["steps"] == 4
    saved = json.loads((tmp_path / "arm" / "model" / "adaptor.json").read_text())
    assert len(saved["bridge_ids"]) == 38 and saved["ctc_weight"] == 0.5  # the head the bridge reads is kept
    r = run("eval-speech", str(tmp_path / "arm"), "--manifest", str(test))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["wer"] == pytest.approx(arm["final"]["wer"])
    step0 = [json.loads((d / "speech_eval_step0.json").read_text())["ctc_cer"] for d in (out, tmp_path / "arm")]
    assert step0[0] == step0[1]
    one_line_error(run(*common, "--adaptor-subsample", "4", "-o", str(tmp_path / "o4")), "subsample=8")
    one_line_error(run(*common[:-1], str(tmp_path / "nowhere"), "-o", str(tmp_path / "o4")),
                   "no finished CTC stage")
    one_line_error(run(*common, "--ctc-steps", "3", "-o", str(tmp_path / "o4")), "replaces ctc_steps")
    one_line_error(run(*common[:-4], "--adaptor-bridge", "chars", "-o", str(tmp_path / "o4")), "--ctc-weight > 0")
    assert not (tmp_path / "o4").exists()
    # bad input: one line, exit 2
    one_line_error(run("eval-speech", str(lm_folder), "--manifest", str(test)), "adaptor.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"audio": "missing.wav", "text": "x"}) + "\n")
    one_line_error(run("train-speech", str(lm_folder), "--manifest", str(bad), "-o", str(tmp_path / "o2")),
                    "does not exist")
    one_line_error(run("train-speech", str(lm_folder), "--manifest", str(train), "--ctc-steps", "10",
                       "--recipe", "paper", "-o", str(tmp_path / "o3")), "needs ctc_weight > 0")
    one_line_error(run("train-speech", str(lm_folder), "--manifest", str(train), "--adaptor-subsample", "0",
                       "-o", str(tmp_path / "o3")), "adaptor-subsample must be >= 1")
    assert not (tmp_path / "o3").exists()
    # clips checked before any model is loaded: longer than the encoder's window, or not 16 kHz
    long_clip = _wav_manifest(tmp_path, ["go left"], "long.jsonl", seconds=0.6)
    one_line_error(run("train-speech", str(lm_folder), "--manifest", str(long_clip), "--encoder", str(enc_dir),
                       "-o", str(tmp_path / "o4")), "0.6 s is longer than the encoder's 0.4 s window")
    one_line_error(run("eval-speech", str(out), "--manifest", str(long_clip)), "longer than the encoder's")
    slow = _wav_manifest(tmp_path, ["go left"], "8k.jsonl", rate=8000)
    one_line_error(run("train-speech", str(lm_folder), "--manifest", str(train), "--test", str(slow),
                       "--encoder", str(enc_dir), "-o", str(tmp_path / "o5")), "need 16 kHz mono 16-bit WAV")
    assert not (tmp_path / "o4").exists() and not (tmp_path / "o5").exists()


def test_encoder_frames_cache_is_exact_and_reused(tmp_path):
    from transformers import WhisperFeatureExtractor

    from kappatune.multimodal.speech_train import encode_clips, load_manifest

    rows = load_manifest(str(_wav_manifest(tmp_path, ["a b", "c d", "e"])))
    model, _ = _speech_setup()
    fe = WhisperFeatureExtractor(feature_size=8)
    plain = encode_clips(model, fe, rows, 40, batch_size=2)
    first = encode_clips(model, fe, rows, 40, batch_size=2, cache_dir=str(tmp_path / "c"))

    def boom(*a, **k):
        raise AssertionError("the encoder ran although the frames were cached")

    model.encoder_frames = boom
    again = encode_clips(model, fe, rows, 40, cache_dir=str(tmp_path / "c"))
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(plain, first, again))
    # a grown manifest encodes only its new clip: a hard link of a cached clip is found by its bytes, an
    # edited copy is not
    import os
    import shutil

    os.link(rows[0]["audio"], tmp_path / "linked.wav")
    shutil.copy(rows[2]["audio"], tmp_path / "edited.wav")
    with open(tmp_path / "edited.wav", "r+b") as f:
        f.seek(60)  # inside the samples, after the 44-byte header
        f.write(b"\x10\x20")
    grown = rows + [dict(rows[0], audio=str(tmp_path / "linked.wav")),
                    dict(rows[2], audio=str(tmp_path / "edited.wav"))]
    del model.encoder_frames  # the real method again
    real, encoded = model.encoder_frames, []

    def counting(f, lens):
        encoded.append(len(lens))
        return real(f, lens)

    model.encoder_frames = counting
    more = encode_clips(model, fe, grown, 40, batch_size=2, cache_dir=str(tmp_path / "c"))
    assert encoded == [1]  # only the edited clip
    assert all(torch.equal(a, b) for a, b in zip(more[:4], plain + plain[:1]))
    assert more[4].shape == plain[2].shape and not torch.equal(more[4], plain[2])
    shards = sorted(os.listdir(next((tmp_path / "c").iterdir())))
    assert len(shards) == 2 and all(name.endswith(".safetensors") for name in shards)
    # a changed encoder is a different cache entry
    other, _ = _speech_setup()
    with torch.no_grad():
        next(other.encoder.parameters()).add_(1.0)
    assert not torch.equal(encode_clips(other, fe, rows, 40, cache_dir=str(tmp_path / "c"))[0], plain[0])


def test_an_interrupted_encoding_keeps_its_finished_shards(tmp_path, monkeypatch):
    from transformers import WhisperFeatureExtractor

    from kappatune.multimodal import frames_cache
    from kappatune.multimodal.speech_train import encode_clips, load_manifest

    monkeypatch.setattr(frames_cache, "SHARD_CLIPS", 2)
    rows = load_manifest(str(_wav_manifest(tmp_path, ["a", "b", "c", "d", "e"])))
    model, _ = _speech_setup()
    fe = WhisperFeatureExtractor(feature_size=8)
    plain = encode_clips(model, fe, rows, 40, batch_size=2)
    real, calls = model.encoder_frames, []

    def dies_on_the_second_shard(f, lens):
        calls.append(len(lens))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(f, lens)

    model.encoder_frames = dies_on_the_second_shard
    with pytest.raises(KeyboardInterrupt):
        encode_clips(model, fe, rows, 40, batch_size=2, cache_dir=str(tmp_path / "c"))
    calls.clear()
    model.encoder_frames = lambda f, lens: calls.append(len(lens)) or real(f, lens)
    again = encode_clips(model, fe, rows, 40, batch_size=2, cache_dir=str(tmp_path / "c"))
    assert calls == [2, 1]  # the first shard's two clips were kept; the other three encoded now
    assert all(torch.equal(a, b) for a, b in zip(again, plain))


def test_a_cache_shard_is_never_left_half_written(tmp_path, monkeypatch):
    import os

    import safetensors.torch

    from kappatune.multimodal import frames_cache

    def dies_while_writing(tensors, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies_while_writing)
    with pytest.raises(KeyboardInterrupt):
        frames_cache.store(str(tmp_path / "f"), {"a": torch.zeros(2)})
    assert os.listdir(tmp_path / "f") == []


def test_news_control_text_is_general_and_separate_from_wikipedia():
    pytest.importorskip("gensim")
    from kappatune.data import news_text, wikipedia_text

    news = news_text()
    assert len(news.split()) > 50_000
    wiki = wikipedia_text(max_articles=20)
    firsts = [p.split(". ")[0] for p in news.split("\n\n")[:50]]
    assert not any(len(s) > 40 and s in wiki for s in firsts)


def test_train_speech_cli_starts_every_selection_from_the_same_adaptor(tmp_path, lm_folder):
    """An ablation compares LLM selections: the adaptor's initial weights must not depend on the order."""
    from safetensors.torch import load_file
    from transformers import WhisperModel

    from conftest import run

    enc_dir = tmp_path / "whisper"
    WhisperModel(_tiny_encoder().config).save_pretrained(enc_dir)
    train = _wav_manifest(tmp_path, ["go left", "stop"], "train.jsonl")
    got = {}
    for order in ("lowest", "random"):
        out = tmp_path / order
        r = run("train-speech", str(lm_folder), "--manifest", str(train), "--encoder", str(enc_dir), "--order",
                order, "--budget-params", "5k", "--max-steps", "1", "--batch-size", "2", "--lr", "1e-9",
                "--adaptor-lr", "1e-9", "--control", "none", "--adaptor-heads", "4", "--recipe", "paper", "-o", str(out))
        assert r.returncode == 0, r.stderr
        got[order] = load_file(str(out / "model" / "adaptor.safetensors"))
    assert all(torch.allclose(got["lowest"][k], got["random"][k], atol=1e-6) for k in got["lowest"])


@pytest.mark.parametrize("order", ["lowest", "random-same-kind", "median"])
def test_train_speech_picks_llm_tensors_through_the_method_registry(order):
    """train-speech's LLM choice is the registered selective method's choice (a new order included), and
    exactly those tensors are left trainable; budget 0 freezes the whole LLM."""
    from kappatune.methods import METHODS
    from kappatune.methods.selective import method_name, selection_for
    from kappatune.multimodal.recipe import prepare_llm

    llm, _ = make_lm()
    assert method_name(order) in METHODS
    sel = prepare_llm(llm, order, 3000, seed=1)
    want = selection_for(kappatune.scan(llm, cache=False), order, budget_params=3000, seed=1)
    assert sel.names == want.names and sel.total_params <= 3000
    assert sorted(n for n, p in llm.named_parameters() if p.requires_grad) == sorted(want.names)
    assert prepare_llm(llm, order, 0, seed=1) is None
    assert not any(p.requires_grad for p in llm.parameters())


def test_audio_use_compares_right_and_wrong_audio_per_token():
    """audio_use: the token-weighted teacher-forced loss with each clip's audio and with the next clip's; with
    the same audio everywhere the two are equal (the gap measures use of the audio's content, nothing else)."""
    from kappatune.multimodal.speech_train import audio_use

    llm, tok = make_lm("llama")
    model = SpeechLLM(_tiny_encoder(), llm, subsample=4, heads=4, layers=2)
    torch.manual_seed(1)
    frames = [torch.randn(n, 16) for n in (8, 12, 6)]
    refs = ["hi there", "ok", "good day to you"]
    got = audio_use(model, tok, frames, refs, batch_size=2)
    ids = [tok(r, add_special_tokens=False)["input_ids"] for r in refs]

    def per_token(audio):
        total = sum(float(model.forward_frames([a], [x], tok.bos_token_id, tok.eos_token_id).loss) * (len(x) + 1)
                    for a, x in zip(audio, ids))
        return total / sum(len(x) + 1 for x in ids)

    model.eval()
    assert got["loss_right_audio"] == pytest.approx(per_token(frames), rel=1e-5)
    assert got["loss_wrong_audio"] == pytest.approx(per_token(frames[1:] + frames[:1]), rel=1e-5)
    assert got["audio_gap"] == pytest.approx(got["loss_wrong_audio"] - got["loss_right_audio"])
    same = audio_use(model, tok, [frames[0]] * 3, refs)
    assert same["audio_gap"] == pytest.approx(0.0, abs=1e-6)
    assert audio_use(model, tok, frames[:1], refs[:1]) == {}


def test_audio_use_per_clip_weights_back_to_the_batched_figure():
    """audio_use_per_clip: each clip's right- and wrong-audio loss; weighted by the clips' token counts they
    give back audio_use's token-weighted losses, and a clip's loss is its own forward pass alone."""
    from kappatune.multimodal.speech_train import audio_use, audio_use_per_clip

    llm, tok = make_lm("llama")
    model = SpeechLLM(_tiny_encoder(), llm, subsample=4, heads=4, layers=2)
    torch.manual_seed(2)
    frames = [torch.randn(n, 16) for n in (8, 12, 6, 10)]
    refs = ["hi there", "ok", "good day to you", "a b c"]
    per = audio_use_per_clip(model, tok, frames, refs)
    batched = audio_use(model, tok, frames, refs, batch_size=3)
    n = per["tokens"]
    assert n == [len(tok(r, add_special_tokens=False)["input_ids"]) + 1 for r in refs]
    for key, figure in (("right", "loss_right_audio"), ("wrong", "loss_wrong_audio")):
        weighted = sum(v * k for v, k in zip(per[key], n)) / sum(n)
        assert weighted == pytest.approx(batched[figure], rel=1e-5)
    ids = tok(refs[1], add_special_tokens=False)["input_ids"]
    model.eval()
    with torch.no_grad():
        alone = float(model.forward_frames([frames[2]], [ids], tok.bos_token_id, tok.eos_token_id).loss)
    assert per["wrong"][1] == pytest.approx(alone, rel=1e-6)  # clip 1's text with clip 2's audio
    assert per["right"][1] != pytest.approx(per["wrong"][1], rel=1e-6)
    assert audio_use_per_clip(model, tok, frames[:1], refs[:1]) == {"right": [], "wrong": [], "tokens": []}


def test_wikipedia_text_is_parsed_once_then_read_from_the_cache(monkeypatch, tmp_path):
    pytest.importorskip("gensim")
    from kappatune import data

    first = data.wikipedia_text()
    assert first.startswith(data.wikipedia_text(max_articles=3))
    assert len(list((tmp_path / "kt-text-cache").glob("wikipedia-*.txt"))) == 1

    def no_parsing(*a, **kw):
        raise AssertionError("parsed again")

    monkeypatch.setattr(data, "_parse_wikipedia", no_parsing)
    assert data.wikipedia_text() == first


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    from kappatune.multimodal.ctc import CHARS, CTC_VOCAB, CharCTCHead

    head = CharCTCHead(CTC_VOCAB * 2, per_position=2)
    with torch.no_grad():  # the head copies its input: position p's two frames read input slices [0:V], [V:2V]
        head.proj.weight.copy_(torch.eye(CTC_VOCAB * 2))
        head.proj.bias.zero_()
    a, b = CHARS.index("a") + 1, CHARS.index("b") + 1
    frames = [a, a, 0, a, b, b, 0, 0]  # "a a _ a b b _ _" -> "aab"
    x = torch.zeros(1, 4, CTC_VOCAB * 2)
    for j, sym in enumerate(frames):
        x[0, j // 2, (j % 2) * CTC_VOCAB + sym] = 5.0
    assert head.greedy(x, torch.tensor([4])) == ["aab"]
    assert head.greedy(x, torch.tensor([1])) == ["a"]  # frames past the length are ignored


def test_shortened_encoder_window_keeps_the_first_positions():
    """shorten_window: the positional table's first rows, the config and the frames' count follow the window;
    at the encoder's own window nothing changes (bit-identical frames); out-of-range windows are refused."""
    from kappatune.errors import KappaTuneError
    from kappatune.multimodal.encoders import shorten_window

    full = _tiny_encoder()
    table = full.embed_positions.weight.detach().clone()
    feats = torch.randn(2, 8, 40)
    ref = full(feats).last_hidden_state
    same = shorten_window(_tiny_encoder(), 0.4)
    assert torch.equal(same(feats).last_hidden_state, ref)
    short = shorten_window(_tiny_encoder(), 0.2)
    assert short.config.max_source_positions == 10
    assert torch.equal(short.embed_positions.weight, table[:10])
    out = short(feats[..., :20]).last_hidden_state
    assert out.shape == (2, 10, 16)
    for bad in (0.0, 0.5):
        with pytest.raises(KappaTuneError, match="--encoder-window must be in"):
            shorten_window(_tiny_encoder(), bad)


def test_encoder_window_through_the_cli_is_recorded_and_reused(tmp_path, lm_folder):
    """train-speech --encoder-window: clips are checked against the shorter window, the window is saved with
    the model, and eval-speech encodes with it again (its WER equals training's final WER)."""
    import json

    from transformers import WhisperModel

    from conftest import one_line_error, run

    enc_dir = tmp_path / "whisper"
    WhisperModel(_tiny_encoder().config).save_pretrained(enc_dir)
    train = _wav_manifest(tmp_path, ["go left", "go right", "stop now"], "train.jsonl", seconds=0.2)
    test = _wav_manifest(tmp_path, ["go left", "stop"], "test.jsonl", seconds=0.2)
    out = tmp_path / "out"
    common = ("--encoder", str(enc_dir), "--budget-params", "0", "--max-steps", "2", "--batch-size", "2",
              "--control", "none", "--adaptor-heads", "4", "--recipe", "paper")
    r = run("train-speech", str(lm_folder), "--manifest", str(train), "--test", str(test), *common,
            "--encoder-window", "0.2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "model" / "adaptor.json").read_text())["encoder_window_s"] == 0.2
    res = json.loads(r.stdout)
    ev = run("eval-speech", str(out), "--manifest", str(test))
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["wer"] == pytest.approx(res["final"]["wer"])
    longer = _wav_manifest(tmp_path, ["go"], "long.jsonl", seconds=0.3)  # fits 0.4 s, not the 0.2 s window
    one_line_error(run("eval-speech", str(out), "--manifest", str(longer)), "longer than the encoder's 0.2 s")
    one_line_error(run("train-speech", str(lm_folder), "--manifest", str(train), *common, "--encoder-window", "1",
                       "-o", str(tmp_path / "o2")), "--encoder-window must be in (0, 0.4]")
    assert not (tmp_path / "o2").exists()


def test_short_train_speech_run_lowers_the_loss_and_learns_to_use_the_audio(tmp_path):
    """24 steps on 4 clips (tones in different mel bins, distinct texts): the teacher-forced loss of the texts
    given their own audio falls, and ends below the loss given another clip's audio (the model reads it)."""
    from transformers import WhisperFeatureExtractor

    from kappatune.multimodal.speech_train import SpeechTrainConfig, load_manifest, train_speech

    texts = ["go left", "go right", "stop now", "turn back"]
    manifest = load_manifest(str(_wav_manifest(tmp_path, texts, freqs=[300, 1200, 2800, 6000])))
    encoder = _tiny_encoder()
    with torch.no_grad():  # a random tiny encoder's frames are mostly its positional table: let the audio through
        encoder.conv1.weight.mul_(100)
    llm, tok = make_lm("llama", seed=0)
    kappatune.apply(llm, kappatune.select(kappatune.scan(llm, cache=False), count=14))
    model = SpeechLLM(encoder, llm, subsample=4, heads=4, layers=2)
    res = train_speech(model, tok, WhisperFeatureExtractor(feature_size=8), manifest, manifest,
                       str(tmp_path / "out"), SpeechTrainConfig(epochs=12, batch_size=2, lr=1e-2, logging_steps=1),
                       n_frames=40)
    start, end = res["history"][0], res["final"]
    assert res["steps"] == 24 and res["trainable"]["llm_tensors"] == 14
    assert end["loss_right_audio"] < start["loss_right_audio"] - 0.2
    assert end["audio_gap"] > 0.02


def test_bridge_compresses_like_the_best_path_and_mixes_the_llm_character_embeddings():
    from kappatune.multimodal.bridge import bridge_embeddings, compress

    g = torch.Generator().manual_seed(0)
    paths = [[0, 1, 1, 0, 2, 2, 1], [0, 0, 0, 3, 3, 3, 3]]  # clip 1 is valid for its first 3 frames only
    logits = torch.nn.functional.one_hot(torch.tensor(paths), 4).float() * 4 + 0.5 * torch.randn(2, 7, 4, generator=g)
    logits.requires_grad_(True)
    lengths = torch.tensor([7, 3])
    assert [k.tolist() for k in compress(logits, lengths)] == [[1, 4, 6], [0]]  # all blank: the first frame
    table = torch.randn(3, 5, generator=g)  # the LLM's embeddings of the 3 characters
    out, lens = bridge_embeddings(logits, lengths, table)
    assert lens.tolist() == [3, 1] and out.shape == (2, 3, 5)
    for row, (clip, frame) in enumerate([(0, 1), (0, 4), (0, 6)]):
        p = logits[clip, frame].detach().softmax(-1)[1:]
        assert torch.allclose(out[0, row], (p / p.sum()) @ table, atol=1e-6)
    p = logits[1, 0].detach().softmax(-1)[1:]
    assert torch.allclose(out[1, 0], (p / p.sum()) @ table, atol=1e-6) and torch.equal(out[1, 1:], torch.zeros(2, 5))
    out[0].sum().backward()  # the LM's loss reaches the head through the kept frames' probabilities only
    assert logits.grad[0, [1, 4, 6]].abs().sum() > 0 and logits.grad[0, [0, 2, 3, 5]].abs().sum() == 0


def test_bridge_needs_one_token_per_character():
    from kappatune.errors import KappaTuneError
    from kappatune.multimodal.bridge import char_token_ids
    from kappatune.multimodal.ctc import CHARS

    def one_each(text, add_special_tokens):
        return {"input_ids": [CHARS.index(text) + 10]}

    assert char_token_ids(one_each) == [i + 10 for i in range(len(CHARS))]

    def two_for_digits(text, add_special_tokens):
        return {"input_ids": [1, 2] if text.isdigit() else [3]}

    with pytest.raises(KappaTuneError, match="'0' as 2 tokens"):
        char_token_ids(two_for_digits)


def test_speech_llm_reads_through_the_bridge_trains_the_head_and_reloads(tmp_path):
    from kappatune.multimodal.ctc import CTC_VOCAB
    from kappatune.multimodal.speech_train import load_speech_model, save_speech_model

    enc = _tiny_encoder()
    llm, tok = make_lm("llama")
    with pytest.raises(ValueError, match="ctc_weight > 0"):
        SpeechLLM(enc, llm, heads=4, layers=1, bridge_ids=list(range(CTC_VOCAB - 1)))
    torch.manual_seed(0)
    model = SpeechLLM(enc, llm, subsample=4, heads=4, layers=1, ctc_weight=0.5,
                      bridge_ids=list(range(3, 3 + CTC_VOCAB - 1)))
    frames = [torch.randn(12, 16), torch.randn(9, 16)]
    from kappatune.multimodal.adaptor import pad_frames

    audio, alens = model.adaptor(*pad_frames(frames))
    emb, lens = model.llm_inputs(audio, alens)
    assert emb.shape[-1] == llm.get_input_embeddings().embedding_dim and (lens <= alens * 4).all()
    out = model.forward_frames(frames, [[5, 6], [7]], bos_id=1, eos_id=2)  # LM loss only: no char_ids
    out.loss.backward()
    assert model.adaptor.ctc_head.proj.weight.grad.abs().sum() > 0  # the LM loss trains the head through the bridge
    save_speech_model(model, tok, str(tmp_path / "m"), keep_aux=False)  # the head stays: the bridge reads it
    again, _, cfg = load_speech_model(str(tmp_path / "m"), enc)
    assert cfg["bridge_ids"] == model.bridge_ids and again.adaptor.ctc_head is not None
    model.eval()
    with torch.no_grad():
        assert torch.allclose(again.forward_frames(frames, [[5, 6], [7]], 1, 2).loss,
                              model.forward_frames(frames, [[5, 6], [7]], 1, 2).loss)


def test_speech_llm_uses_the_vectors_a_scaled_embedding_llm_reads():
    """Gemma's embedding module multiplies its table by sqrt(hidden) in forward. The output norm's target
    scale and the bridge's character vectors must be what the layers read (the module's output), not the raw
    table, which is sqrt(32) = 5.7 times smaller here."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kappatune.multimodal.ctc import CTC_VOCAB
    from kappatune.multimodal.model import embedding_rms

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    llm = AutoModelForCausalLM.from_config(cfg)
    layer = llm.get_input_embeddings()
    read = layer(torch.arange(64)).detach()
    table_rms = float(layer.weight.detach().pow(2).mean().sqrt())
    assert float(read.pow(2).mean().sqrt()) == pytest.approx(table_rms * 32 ** 0.5, rel=1e-5)  # the premise
    assert embedding_rms(llm) == pytest.approx(float(read.pow(2).mean().sqrt()), rel=1e-5)
    llama, _ = make_lm("llama")  # a plain embedding: exactly the table's RMS, as before
    assert embedding_rms(llama) == float(llama.get_input_embeddings().weight.detach().pow(2).mean().sqrt())

    chars = list(range(3, 3 + CTC_VOCAB - 1))
    model = SpeechLLM(_tiny_encoder(), llm, subsample=4, heads=4, layers=1, ctc_weight=1.0, bridge_ids=chars)
    head = model.adaptor.ctc_head.proj
    with torch.no_grad():  # the head reads character 5 at every frame, with certainty
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.bias.view(-1, CTC_VOCAB)[:, 1 + 5] = 30.0  # each of the position's CTC frames
    audio, alens = model.adaptor(torch.randn(1, 8, 16), torch.tensor([8]))
    emb, lens = model.llm_inputs(audio, alens)
    assert lens.tolist() == [1]  # one character, repeated: one kept frame
    assert torch.allclose(emb[0, 0], read[chars[5]], atol=1e-5)


def test_a_stage_trained_for_a_scaled_embedding_llm_records_the_scale_and_one_without_it_is_refused(tmp_path):
    """The output norm's target is the embedding module's output scale: a Gemma-style stage saved without that
    factor (as before it was recorded) must not load, while plain-embedding stages keep their fingerprint."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from kappatune.errors import KappaTuneError
    from kappatune.multimodal.ctc_stage import STAGE_RECORD, STAGE_WEIGHTS, load_ctc_stage
    from kappatune.multimodal.speech_train import adaptor_structure, stage_fingerprint

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    gemma = SpeechLLM(_tiny_encoder(), AutoModelForCausalLM.from_config(cfg), subsample=4, heads=4, layers=1,
                      out_norm=True)
    llama = SpeechLLM(_tiny_encoder(), make_lm("llama")[0], subsample=4, heads=4, layers=1, out_norm=True)
    meta = {"encoder": "enc", "encoder_window_s": 14.0, "llm": "lm"}
    fp = stage_fingerprint(gemma, meta)
    assert fp["embedding_scale"] == pytest.approx(32 ** 0.5, abs=1e-4)
    assert stage_fingerprint(llama, meta) == {**adaptor_structure(llama), **meta}  # no new key: old stages load

    old = {k: v for k, v in fp.items() if k != "embedding_scale"}
    save_file({k: v.contiguous() for k, v in gemma.adaptor.state_dict().items()}, str(tmp_path / STAGE_WEIGHTS))
    (tmp_path / STAGE_RECORD).write_text(json.dumps({"steps": 1, "fingerprint": old}))
    with pytest.raises(KappaTuneError, match="embedding_scale"):
        load_ctc_stage(gemma.adaptor, str(tmp_path), fp)
    (tmp_path / STAGE_RECORD).write_text(json.dumps({"steps": 1, "fingerprint": fp}))
    assert load_ctc_stage(gemma.adaptor, str(tmp_path), fp)["steps"] == 1
