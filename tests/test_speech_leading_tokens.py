"""Algorithm 2 with an LLM whose tokenizer puts BOS before every text (Gemma, Llama): the audio goes after
those leading tokens, in training, in the listening diagnostic and in greedy decoding; SmolLM2-like
tokenizers (no leading tokens) keep the sequence they had."""

import torch

from conftest import char_tokenizer, make_lm
from kappatune.multimodal import SpeechLLM, build_inputs
from kappatune.multimodal.speech_train import load_speech_model, save_speech_model


def test_leading_tokens_come_before_the_audio_and_are_not_predicted():
    emb = torch.nn.Embedding(20, 3)
    audio = torch.randn(2, 4, 3)
    plain = build_inputs(audio, torch.tensor([4, 2]), [[5, 6, 7], [8]], emb, bos_id=1, eos_id=2)
    led, att, lab = build_inputs(audio, torch.tensor([4, 2]), [[5, 6, 7], [8]], emb, bos_id=1, eos_id=2,
                                 lead_ids=[9])
    # sample 0: <9> + 4 audio + BOS + 3 text + EOS = 10; sample 1: <9> + 2 audio + BOS + 1 text + EOS = 6
    assert led.shape == (2, 10, 3)
    assert att.tolist() == [[1] * 10, [1] * 6 + [0] * 4]
    assert lab.tolist() == [[-100] * 6 + [5, 6, 7, 2], [-100] * 4 + [8, 2] + [-100] * 4]
    assert torch.allclose(led[:, 0], emb(torch.tensor([9, 9])))
    assert torch.equal(led[0, 1:5], audio[0]) and torch.equal(led[1, 1:3], audio[1, :2])
    # after the leading token the sequence is the plain one, shifted by one position
    assert torch.equal(led[0, 1:], plain[0][0]) and torch.equal(lab[0, 1:], plain[2][0])
    assert torch.equal(led[1, 1:6], plain[0][1, :5])


def _speech_model(lead_ids):
    from test_multimodal import _tiny_encoder

    llm, tok = make_lm("llama")
    torch.manual_seed(0)
    model = SpeechLLM(_tiny_encoder(), llm, subsample=4, heads=4, layers=1).eval()
    model.bos_id, model.eos_id, model.lead_ids = 1, 2, list(lead_ids)
    return model


def test_loss_and_greedy_decoding_read_the_leading_tokens_first():
    model = _speech_model([1])
    frames = [torch.randn(12, 16)]
    from kappatune.multimodal.adaptor import pad_frames

    with torch.no_grad():
        audio, alens = model.adaptor(*pad_frames(frames))
        table = model.llm.get_input_embeddings()
        seq = torch.cat([table(torch.tensor([1])), audio[0], table(torch.tensor([1, 5, 6, 2]))])[None]
        want = model.llm(inputs_embeds=seq, labels=torch.tensor([[-100] * 5 + [5, 6, 2]])).loss
        assert torch.allclose(model.forward_frames(frames, [[5, 6]]).loss, want)
    seen = []  # what greedy decoding feeds the LLM first: the whole prompt
    hook = model.llm.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["inputs_embeds"]),
                                               with_kwargs=True)
    try:
        model.transcribe_frames(frames, 1, eos_id=-1, max_new_tokens=1)
    finally:
        hook.remove()
    assert torch.allclose(seen[0], seq[:, :5])  # [BOS, audio, BOS]
    no_lead = _speech_model([])
    assert no_lead.forward_frames(frames, [[5, 6]]).loss != model.forward_frames(frames, [[5, 6]]).loss


def test_a_reloaded_speech_model_takes_its_leading_tokens_from_its_tokenizer(tmp_path):
    from test_multimodal import _tiny_encoder

    for bos, want in ((True, [1]), (False, [])):
        model = _speech_model([])
        save_speech_model(model, char_tokenizer(bos=bos), str(tmp_path / f"m{bos}"))
        again, tok, _ = load_speech_model(str(tmp_path / f"m{bos}"), _tiny_encoder())
        assert again.lead_ids == want
