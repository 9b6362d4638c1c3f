"""Tokenizers that put BOS before every text (Gemma, Llama): every sequence a model is trained or evaluated
on starts with it, the text after it is what a tokenizer without BOS gives, and lengths stay as asked."""

import pytest

from kappatune.data import PromptTemplate, leading_special_ids, tokenize_examples
from kappatune.evaluate import accuracy_and_perplexity, control_chunks, label_accuracy, task_perplexity
from kappatune.methods.corda_kpm import calibration_split

from conftest import char_tokenizer, make_lm, toy_rows

TEXT = " ".join(f"Sentence {i} of a corpus about rivers and towns." for i in range(200))


def test_leading_special_ids_finds_bos_only_where_the_tokenizer_adds_it():
    assert leading_special_ids(char_tokenizer(bos=True)) == [1]
    assert leading_special_ids(char_tokenizer()) == []


def test_control_chunks_start_with_bos_and_keep_their_length():
    plain = char_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]
    with_bos = control_chunks(char_tokenizer(bos=True), TEXT, 64, 8)
    assert len(with_bos) == 8 and all(len(c) == 64 and c[0] == 1 for c in with_bos)
    assert [t for c in with_bos for t in c[1:]] == plain[:8 * 63]  # contiguous text after each BOS
    assert control_chunks(char_tokenizer(), TEXT, 64, 8) == [plain[i * 64:(i + 1) * 64] for i in range(8)]


@pytest.mark.parametrize("max_chunks", [0, -3])
def test_control_chunks_refuses_fewer_than_one_chunk(max_chunks):
    from kappatune.errors import KappaTuneError

    with pytest.raises(KappaTuneError, match="max_chunks must be at least 1"):  # 0 once looped forever
        control_chunks(char_tokenizer(), TEXT, 64, max_chunks)


def test_examples_keep_bos_through_left_truncation_and_take_no_loss_on_it():
    tok, plain_tok = char_tokenizer(bos=True), char_tokenizer()
    tpl = PromptTemplate("T: {text}\nS: {label}")
    row = [{"text": "hi", "label": "pos"}]
    ex, plain = tokenize_examples(row, tok, tpl)[0], tokenize_examples(row, plain_tok, tpl)[0]
    assert ex["input_ids"] == [1] + plain["input_ids"] and ex["labels"] == [-100] + plain["labels"]
    cut = tokenize_examples([{"text": "x" * 100, "label": "pos"}], tok, tpl, max_length=20)[0]
    assert len(cut["input_ids"]) == 20 and cut["input_ids"][0] == 1 and cut["labels"][0] == -100
    assert cut["input_ids"][-4:] == plain_tok("pos</s>", add_special_tokens=False)["input_ids"][-4:]


@pytest.mark.parametrize("labels", [("x", "y", "z"), ("positive", "negative")])
def test_accuracy_and_perplexity_see_bos_and_agree_with_the_separate_figures(labels):
    model, _ = make_lm(seed=5)
    tok = char_tokenizer(bos=True)
    tpl = PromptTemplate()
    rows = [{"text": r["text"], "label": labels[i % len(labels)]} for i, r in enumerate(toy_rows(12, seed=2))]
    seen = []
    hook = model.register_forward_hook(lambda mod, args, kw, out: seen.append(kw["input_ids"][:, 0].tolist()),
                                       with_kwargs=True)
    both = accuracy_and_perplexity(model, tok, rows, tpl, sorted(labels))
    hook.remove()
    assert seen and all(first == 1 for batch in seen for first in batch)
    assert both["accuracy"] == label_accuracy(model, tok, rows, tpl, sorted(labels), batch_size=8)
    assert both["ppl"]["ppl"] == pytest.approx(task_perplexity(model, tok, rows, tpl)["ppl"], rel=1e-5)
    # BOS changes what the model reads: the figures differ from those without it
    assert both["ppl"]["ppl"] != pytest.approx(task_perplexity(model, char_tokenizer(), rows, tpl)["ppl"], rel=1e-6)


def test_corda_calibration_with_bos_stays_disjoint_from_the_evaluation_text():
    tok = char_tokenizer(bos=True)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    split = calibration_split(tok, TEXT, calib_chunks=10, chunk_len=48, eval_chunks=8, eval_chunk_len=64)
    assert split.eval_end == 8 * 63 and split.end == len(ids) and split.start == len(ids) - 10 * 47
    assert split.start >= split.eval_end
    assert split.chunks == [[1] + ids[split.start + i * 47: split.start + (i + 1) * 47] for i in range(10)]
