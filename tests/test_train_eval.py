import json
import math
import os

import pytest
import torch
from transformers import TrainerCallback

import kappatune
from kappatune.hashing import tensor_hash as tensor_digest
from kappatune.data import PromptTemplate, load_records, tokenize_examples
from kappatune.errors import KappaTuneError
from kappatune.evaluate import accuracy_and_perplexity, label_accuracy, perplexity, task_perplexity
from kappatune.train import METHODS, TrainConfig, TrainingInterrupted, train
from conftest import InterruptAt, make_lm, toy_rows


def _digests(model):
    return {n: tensor_digest(p) for n, p in model.named_parameters()}


class _OptimizerSpy(TrainerCallback):
    def on_train_end(self, args, state, control, optimizer=None, model=None, **kw):
        self.opt_params = [p for g in optimizer.param_groups for p in g["params"]]
        self.opt_state_tensors = sum(1 for s in optimizer.state.values() if s)


@pytest.mark.parametrize("method", ["kappatune", "highest-kappa", "random", "random-same-kind", "full", "lora",
                                    "kappatune-lora"])
def test_each_method_changes_exactly_what_it_trains(method, tmp_path):
    model, tok = make_lm()
    before = _digests(model)
    spy = _OptimizerSpy()
    cfg = TrainConfig(method=method, budget_params=3000, epochs=2, batch_size=4, lr=5e-3, weight_decay=0.1,
                      save_steps=100, progress=False, logging_steps=2)
    res = train(model, tok, toy_rows(), str(tmp_path / "out"), cfg, extra_callbacks=[spy])
    assert res.frozen_verified
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    after = _digests(final)
    changed = sorted(n for n in before if before[n] != after[n])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(c["name"] for c in manifest["changed"]) == changed
    if method in ("kappatune", "highest-kappa", "random", "random-same-kind"):
        sel = kappatune.Selection.load(str(tmp_path / "out" / "selection.json"))
        assert changed == sorted(sel.names)  # every selected tensor moved, nothing else did (weight decay on)
        assert sel.total_params <= 3000
        # AdamW holds state for the selected tensors only
        assert sum(p.numel() for p in spy.opt_params) == sel.total_params
        assert spy.opt_state_tensors == len(sel.names)
    elif method == "full":
        assert len(changed) >= len(before) - 2
    else:
        assert changed and all(n.endswith(".weight") for n in changed)
        assert (tmp_path / "out" / "adapter").is_dir()
        kinds = {n.split(".")[-2] for n in changed}
        assert kinds <= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert sum(p.numel() for p in spy.opt_params) == res.trainable_params
    assert json.loads((tmp_path / "out" / "train_log.json").read_text())
    assert (tmp_path / "out" / "model" / "tokenizer.json").exists()


def test_method_order_differs():
    assert {"kappatune", "highest-kappa", "random", "random-same-kind", "full", "lora", "kappatune-lora"} <= set(METHODS)


def test_interrupt_then_resume_equals_uninterrupted_run(tmp_path):
    rows = toy_rows(32)
    cfg = TrainConfig(method="kappatune", budget_params=3000, max_steps=8, batch_size=4, lr=5e-3,
                      weight_decay=0.1, save_steps=100, progress=False)
    m1, tok = make_lm()
    train(m1, tok, rows, str(tmp_path / "a"), cfg)
    m2, tok = make_lm()
    with pytest.raises(TrainingInterrupted, match="rerun"):
        train(m2, tok, rows, str(tmp_path / "b"), cfg, extra_callbacks=[InterruptAt(3)])
    assert not (tmp_path / "b" / "model").exists()  # no half-finished output
    ckpts = sorted(os.listdir(tmp_path / "b" / "checkpoints"))
    assert ckpts and ckpts[-1] in ("checkpoint-3", "checkpoint-4")  # saved right after the signal
    m3, tok = make_lm()
    res = train(m3, tok, rows, str(tmp_path / "b"), cfg)
    assert res.steps == 8
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_perplexity_equals_hand_computation():
    model, tok = make_lm()
    model.eval()
    text = "the quick brown fox jumps over the lazy dog " * 6
    res = perplexity(model, tok, text, chunk_len=32, max_chunks=3)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    total, n = 0.0, 0
    with torch.no_grad():
        for c in range(3):
            chunk = ids[c * 32:(c + 1) * 32]
            for t in range(1, 32):  # predict token t from tokens < t, one position at a time
                logits = model(input_ids=torch.tensor([chunk[:t]])).logits[0, -1].double()
                total -= float(torch.log_softmax(logits, -1)[chunk[t]])
                n += 1
    assert res["tokens"] == n == 3 * 31
    assert res["ppl"] == pytest.approx(math.exp(total / n), rel=1e-5)


class _TableLM(torch.nn.Module):
    """Logits depend only on the current input token, through a fixed table: answers are computable by hand."""

    def __init__(self, table):
        super().__init__()
        self.table = table  # (V, V) log-probability table
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        class O:
            pass

        o = O()
        o.logits = self.table[input_ids]
        return o


class _Tok:
    """Whitespace tokenizer over a tiny fixed vocabulary."""

    vocab = {"<pad>": 0, "</s>": 1, "Q:": 2, "a": 3, "b": 4, "A:": 5, "yes": 6, "no": 7, "maybe": 8, "so": 9}
    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab[w] for w in text.split()]}


def test_label_accuracy_hand_made_with_multi_token_label():
    V = 10
    table = torch.full((V, V), -10.0)
    # after "A:" -> "yes" likely (-1), "no" less (-2), "maybe" (-3)
    table[5, 6], table[5, 7], table[5, 8] = -1.0, -2.0, -3.0
    # after "maybe" -> "so" very likely: the two-token label "maybe so" scores -3 + -0.1 = -3.1
    table[8, 9] = -0.1
    # a prompt ending in "b" flips the preference through the token before "A:"? No: logits depend on the
    # current token only, so all prompts ending in "A:" predict "yes".
    model = _TableLM(torch.log_softmax(table, -1))
    tpl = PromptTemplate("Q: {text} A: {label}")
    rows = [{"text": "a", "label": "yes"}, {"text": "b", "label": "no"}, {"text": "a", "label": "maybe so"},
            {"text": "b", "label": "yes"}]
    res = label_accuracy(model, _Tok(), rows, tpl, ["yes", "no", "maybe so"])
    assert res["predicted_counts"] == {"yes": 4, "no": 0, "maybe so": 0}
    assert res["accuracy"] == 0.5
    # make the two-token label win: its score is a sum over its tokens
    table[5, 8] = 0.0
    table[8, 9] = 0.0
    model = _TableLM(torch.log_softmax(table, -1))
    res = label_accuracy(model, _Tok(), rows, tpl, ["yes", "no", "maybe so"])
    assert res["predicted_counts"]["maybe so"] == 4 and res["accuracy"] == 0.25


@pytest.mark.parametrize("labels", [("x", "y", "z"), ("positive", "negative")])
def test_accuracy_and_perplexity_share_one_forward_and_agree(labels):
    """Single-token labels: one forward per batch gives both figures; multi-token labels fall back. Either way
    the figures equal label_accuracy's and task_perplexity's own."""
    model, tok = make_lm(seed=3)
    tpl = PromptTemplate()
    rows = [{"text": r["text"], "label": labels[i % len(labels)]} for i, r in enumerate(toy_rows(20, seed=1))]
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    both = accuracy_and_perplexity(model, tok, rows, tpl, sorted(labels))
    shared_calls = len(calls)
    hook.remove()
    acc = label_accuracy(model, tok, rows, tpl, sorted(labels), batch_size=8)
    ppl = task_perplexity(model, tok, rows, tpl)
    assert both["accuracy"] == acc
    assert both["ppl"]["ppl"] == pytest.approx(ppl["ppl"], rel=1e-5)
    assert both["ppl"]["tokens"] == ppl["tokens"]
    single = all(len(tok(lab, add_special_tokens=False)["input_ids"]) == 1 for lab in labels)
    # 20 rows in batches of 8: three forwards when shared, more when the two figures are computed apart
    assert (shared_calls == 3) if single else (shared_calls > 3)


def test_answer_only_loss_masks_the_prompt():
    _, tok = make_lm()
    tpl = PromptTemplate("T: {text}\nS: {label}")
    ex = tokenize_examples([{"text": "hi", "label": "pos"}], tok, tpl, loss_on="answer")[0]
    p_len = len(tok("T: hi\nS: ")["input_ids"])
    assert ex["labels"][:p_len] == [-100] * p_len
    assert ex["labels"][p_len:] == ex["input_ids"][p_len:]
    assert ex["input_ids"][-1] == tok.eos_token_id
    full = tokenize_examples([{"text": "hi", "label": "pos"}], tok, tpl, loss_on="all")[0]
    assert full["labels"] == full["input_ids"]
    cut = tokenize_examples([{"text": "x" * 100, "label": "pos"}], tok, tpl, max_length=20, loss_on="answer")[0]
    assert len(cut["input_ids"]) == 20 and cut["labels"][-4:] == cut["input_ids"][-4:]  # answer kept


def test_bad_data(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(KappaTuneError, match="no examples"):
        load_records(str(tmp_path / "empty.jsonl"))
    rows = [{"tweet": "x", "label": "a"}]
    with pytest.raises(KappaTuneError, match="column 'text'"):
        PromptTemplate().check(rows)
    with pytest.raises(KappaTuneError, match="no {label} field"):
        PromptTemplate("Tweet: {text}", "label")
    with pytest.raises(KappaTuneError, match="not among the labels"):
        model, tok = make_lm()
        label_accuracy(model, tok, [{"text": "x", "label": "zzz"}], PromptTemplate(), ["a", "b"])
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(KappaTuneError, match=":2: not a JSON object"):
        load_records(str(tmp_path / "bad.jsonl"))


class _MoveTensor(TrainerCallback):
    """Sabotage: after each step, nudge one element of a named tensor (or of one of its rows)."""

    def __init__(self, name, row=0):
        self.name, self.row = name, row

    def on_step_end(self, args, state, control, model=None, **kw):
        with torch.no_grad():
            dict(model.named_parameters())[self.name].view(-1, 1)[self.row] += 1.0


def _trainer(model, tok, tmp_path, callbacks, optimizers=(None, None)):
    from transformers import Trainer, TrainingArguments

    from kappatune.data import PadCollator

    ex = tokenize_examples(toy_rows(8), tok, PromptTemplate("Tweet: {text}\nSentiment: {label}", "label"),
                           max_length=64)
    args = TrainingArguments(output_dir=str(tmp_path / "ck"), max_steps=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False)
    return Trainer(model=model, args=args, train_dataset=ex, data_collator=PadCollator(tok.pad_token_id or 0),
                   callbacks=callbacks, optimizers=optimizers)


@pytest.mark.parametrize("sabotage", [False, True])
def test_frozen_tensors_callback_with_your_own_trainer(sabotage, tmp_path):
    """prepare + FrozenTensorsCallback in a user's Trainer: verified when nothing frozen moved; raises when one
    frozen tensor is touched mid-training."""
    from kappatune.integrations.trainer import FrozenTensorsCallback, prepare

    model, tok = make_lm()
    sel = kappatune.select(kappatune.scan(model, cache=False), budget_params=2000)
    prepare(model, sel)
    frozen = next(n for n, p in model.named_parameters() if not p.requires_grad and p.dim() == 2)
    guard = FrozenTensorsCallback()
    extra = [_MoveTensor(frozen)] if sabotage else []
    trainer = _trainer(model, tok, tmp_path, [guard, *extra])
    if sabotage:
        with pytest.raises(KappaTuneError, match="frozen tensor"):
            trainer.train()
        assert guard.verified is False
    else:
        trainer.train()
        assert guard.verified is True


def test_frozen_tensors_callback_sees_unselected_expert_rows(tmp_path):
    """A fused MoE parameter trained by slice: moving a row of an unselected expert is caught, although the
    parameter as a whole requires grad (the callback reads the rows from apply's handle, not the model)."""
    from kappatune.integrations.trainer import FrozenTensorsCallback, prepare
    from kappatune.slices import build_optimizer

    model, tok = make_lm("qwen2_moe")
    sel = kappatune.select(kappatune.scan(model, cache=False), count=1, groups=["expert"])
    handle = prepare(model, sel)
    (name, rows), = handle.slice_rows.items()
    outside = next(i for i in range(dict(model.named_parameters())[name].view(-1, 1).shape[0])
                   if i // dict(model.named_parameters())[name].shape[-1] not in set(rows.tolist()))
    guard = FrozenTensorsCallback()
    opt = build_optimizer(model, sel, lr=1e-3)
    trainer = _trainer(model, tok, tmp_path, [guard, _MoveTensor(name, outside)], optimizers=(opt, None))
    with pytest.raises(KappaTuneError, match="frozen tensor"):
        trainer.train()
    assert guard.verified is False


def test_kappa_monitor_follows_trained_tensors_against_an_independent_svd(tmp_path):
    """kappa_monitor.json: the selected tensors at step 0, every 2 steps and at the end; the figures at step 0
    match a float64 SVD of the original weights, and the last ones the saved model's weights."""
    model, tok = make_lm()
    orig = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(method="kappatune", budget_params=3000, max_steps=4, batch_size=4, lr=5e-2,
                      progress=False, monitor_every=2)
    res = train(model, tok, toy_rows(16), str(tmp_path / "o"), cfg)
    mon = json.loads((tmp_path / "o" / "kappa_monitor.json").read_text())
    sel = kappatune.Selection.load(str(tmp_path / "o" / "selection.json"))
    assert [r["step"] for r in mon["records"]] == [0, 2, 4]
    assert set(mon["records"][0]["tensors"]) == set(sel.names)
    from transformers import AutoModelForCausalLM

    final = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "model").named_parameters())
    for n in sel.names:
        for rec, w in ((mon["records"][0], orig[n]), (mon["records"][-1], final[n].detach().double())):
            s = torch.linalg.svdvals(w)
            assert rec["tensors"][n]["kappa"] == pytest.approx(float(s[0] / s[-1]), rel=1e-6)
    first, last = mon["records"][0]["tensors"], mon["records"][-1]["tensors"]
    assert any(first[n]["kappa"] != last[n]["kappa"] for n in sel.names)  # lr 5e-2 moves the spectra
    assert res.info["kappa_monitor"]["median_dlog10_kappa"] == pytest.approx(
        sorted(mon["summary"]["tensors"][n]["dlog10_kappa"] for n in sel.names)[len(sel.names) // 2])


def test_kappa_monitor_follows_the_merged_lora_weight(tmp_path):
    """For LoRA the monitor follows W + scale * B A; at the end that is the saved (merged) weight."""
    model, tok = make_lm()
    cfg = TrainConfig(method="lora", budget_params=3000, max_steps=3, batch_size=4, lr=5e-2, progress=False,
                      lora_targets=("q_proj", "v_proj"))
    train(model, tok, toy_rows(16), str(tmp_path / "o"), cfg)
    mon = json.loads((tmp_path / "o" / "kappa_monitor.json").read_text())
    last = mon["records"][-1]["tensors"]
    assert last and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in last)
    from transformers import AutoModelForCausalLM

    final = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "model").named_parameters())
    for n, fig in last.items():
        s = torch.linalg.svdvals(final[n].detach().double())
        assert fig["kappa"] == pytest.approx(float(s[0] / s[-1]), rel=1e-4)
