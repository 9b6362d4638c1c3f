"""scripts/speech_phoneme_probe.py and the CTC head's alphabet/width options: the phoneme symbols taken from
espeak-ng's output, the error rate over symbols, and a head with its own vocabulary and hidden layer."""

import shutil

import pytest
import torch
from conftest import load_script

from kappatune.multimodal.ctc import CTC_VOCAB, CharCTCHead


def _probe():
    return load_script("speech_phoneme_probe")


def test_phonemes_of_splits_words_and_phonemes_and_drops_stress_marks():
    p = _probe()
    espeak_x = "I_s_l_'A:_m\nw#_,I_tS @_r_'I_dZ\n"
    assert p.phonemes_of(espeak_x) == ["I", "s", "l", "A:", "m", "|", "w#", "I", "tS", "|", "@", "r", "I", "dZ"]
    assert p.phonemes_of("  \n") == []
    assert p.phonemes_of("' _,") == []  # a word of stress marks only adds no boundary


def test_char_symbols_put_the_boundary_where_the_spaces_are():
    p = _probe()
    assert p.char_symbols("Hi,  there!") == ["h", "i", "|", "t", "h", "e", "r", "e"]


def test_symbol_error_rate_counts_edits_over_reference_symbols():
    p = _probe()
    refs = [["D", "@", "|", "k", "a", "t"], ["s", "aU", "n", "d"]]
    hyps = [["D", "@2", "|", "k", "a", "t"], ["s", "aU", "d"]]  # one substitution, one deletion
    assert p.symbol_error_rate(refs, hyps) == pytest.approx(2 / 10)
    assert p.symbol_error_rate(refs, [[], []]) == pytest.approx(1.0)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_espeak_phonemes_depend_on_the_voice_where_the_dialects_differ():
    p = _probe()
    gb = p.espeak_phonemes("the cat", "en-gb")
    assert gb.count("|") == 1 and "k" in gb
    # Caribbean English says "the" with a d where British English has the dental fricative D
    assert gb[0] == "D" and p.espeak_phonemes("the cat", "en-029")[0] == "d"


def test_head_with_its_own_vocabulary_and_hidden_layer_has_the_right_shapes_and_learns():
    torch.manual_seed(0)
    head = CharCTCHead(dim=16, per_position=2, vocab=7, hidden=32)
    x = torch.randn(3, 5, 16)
    assert head.frame_logits(x).shape == (3, 10, 7)
    assert isinstance(head.proj, torch.nn.Sequential)
    assert CharCTCHead(16, 2).frame_logits(x).shape == (3, 10, CTC_VOCAB)  # the default keeps the characters
    lengths = torch.tensor([5, 4, 3])
    targets = [[1, 2, 3], [4, 5], [6]]
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = float(head.loss(x, lengths, targets).detach())
    for _ in range(150):
        opt.zero_grad()
        head.loss(x, lengths, targets).backward()
        opt.step()
    assert float(head.loss(x, lengths, targets).detach()) < first / 4
    assert head.best_paths(x, lengths) == targets  # the fitted head reads its targets back


def test_best_paths_merge_repeats_and_drop_blanks_within_each_clips_length():
    head = CharCTCHead(dim=4, per_position=1, vocab=4)
    best = torch.tensor([[1, 1, 0, 1, 2, 2, 3], [0, 3, 3, 0, 0, 2, 2]])
    logits = torch.nn.functional.one_hot(best, 4).float()
    head.frame_logits = lambda x: logits  # the decoding alone, on known frame-wise winners
    assert head.best_paths(torch.zeros(2, 7, 4), torch.tensor([7, 4])) == [[1, 1, 2, 3], [3]]


def test_mask_frames_zeroes_bounded_spans_of_a_copy_and_repeats_with_the_seed():
    from kappatune.multimodal.ctc_stage import mask_frames

    frames = torch.randn(100, 64) + 5.0  # no zeros of its own
    kept = frames.clone()
    masked = mask_frames(frames, torch.Generator().manual_seed(0), time_masks_per_s=1.0, max_time=10,
                         channel_masks=2, max_channels=8)
    assert torch.equal(frames, kept)  # the cached frames are never changed
    zero = masked == 0
    full_rows, full_cols = zero.all(1), zero.all(0)
    assert int(full_rows.sum()) <= 2 * 10  # 100 frames at 50 per second: two time masks of <= 10 frames
    assert int(full_cols.sum()) <= 2 * 8
    # every zero lies in a masked row or column: nothing else is touched
    assert bool((zero <= (full_rows[:, None] | full_cols[None, :])).all())
    assert torch.equal(masked[~zero], frames[~zero])
    again = mask_frames(frames, torch.Generator().manual_seed(0), time_masks_per_s=1.0, max_time=10,
                        channel_masks=2, max_channels=8)
    assert torch.equal(masked, again)
    many = mask_frames(frames, torch.Generator().manual_seed(1), time_masks_per_s=20.0, max_time=10)
    assert int((many == 0).all(1).sum()) > 20  # more masks per second mask more frames


def test_ctc_stage_with_masking_trains_on_copies_and_still_lowers_its_loss():
    from kappatune.multimodal.adaptor import SpeechAdaptor
    from kappatune.multimodal.ctc_stage import ctc_pretrain, mask_frames

    torch.manual_seed(0)
    adaptor = SpeechAdaptor(16, 24, subsample=2, heads=2, layers=1, ctc_head=True)
    frames = [torch.randn(40, 16) for _ in range(4)]
    kept = [f.clone() for f in frames]
    targets = [[3, 4, 5], [6, 7], [8, 9, 10], [11]]
    hist = ctc_pretrain(adaptor, frames, targets, steps=120, lr=3e-3, batch_size=4, seed=0, log_every=20,
                        augment=lambda f, g: mask_frames(f, g, max_time=3, max_channels=2))
    assert all(torch.equal(a, b) for a, b in zip(frames, kept))
    assert hist[-1]["ctc_loss"] < hist[0]["ctc_loss"] * 0.7
