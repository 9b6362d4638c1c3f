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
    assert float(head.loss(x, lengths, targets)) < first / 4
    assert head.best_paths(x, lengths) == targets  # the fitted head reads its targets back


def test_best_paths_merge_repeats_and_drop_blanks_within_each_clips_length():
    head = CharCTCHead(dim=4, per_position=1, vocab=4)
    best = torch.tensor([[1, 1, 0, 1, 2, 2, 3], [0, 3, 3, 0, 0, 2, 2]])
    logits = torch.nn.functional.one_hot(best, 4).float()
    head.frame_logits = lambda x: logits  # the decoding alone, on known frame-wise winners
    assert head.best_paths(torch.zeros(2, 7, 4), torch.tensor([7, 4])) == [[1, 1, 2, 3], [3]]
