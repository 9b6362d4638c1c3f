"""scripts/speech_oracle_probe.py: the corrupted spellings the LLM reads, the inputs built from them, the
rate schedule, and a short run on a tiny LM whose loss falls."""

import json
import random

import pytest
import torch
from conftest import load_script

from kappatune.multimodal.ctc import CHARS, char_targets


def _probe():
    return load_script("speech_oracle_probe")


def _levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def test_corrupt_keeps_clean_spelling_at_rate_zero_and_hits_every_character_at_rate_one():
    p = _probe()
    chars = char_targets("the stapes to the inner ear")
    assert p.corrupt(chars, 0.0, random.Random(0)) == chars
    hit = p.corrupt(chars, 1.0, random.Random(0))
    assert hit and hit != chars
    assert all(1 <= c <= len(CHARS) for c in hit)
    # every character was hit: none survives in place unless an insertion kept it after a new letter
    kept_in_place = sum(1 for a, b in zip(hit, chars) if a == b)
    assert kept_in_place < len(chars) // 2
    assert p.corrupt(char_targets("a"), 1.0, random.Random(3))  # a deleted lone character is not left empty


def test_corruption_rate_is_the_character_error_rate_it_produces():
    p = _probe()
    texts = ["this vibrates and sound is transmitted through a single bone"] * 60
    for rate in (0.1, 0.3):
        reads = p.readings(texts, rate, seed=5)
        ref = char_targets(texts[0])
        errors = sum(_levenshtein(ref, r) for r in reads)
        cer = errors / (len(ref) * len(texts))
        assert abs(cer - rate) < 0.05 * (1 + rate * 2), (rate, cer)


def test_readings_are_fixed_by_the_seed():
    p = _probe()
    texts = ["one two three", "four five six"]
    assert p.readings(texts, 0.3, 1) == p.readings(texts, 0.3, 1)
    assert p.readings(texts, 0.3, 1) != p.readings(texts, 0.3, 2)


def test_spelled_inputs_are_the_embedding_rows_zero_padded():
    p = _probe()
    embed = torch.nn.Embedding(50, 2)
    x, lens = p.spelled(embed, [[5, 6, 7], [49]])
    assert lens.tolist() == [3, 1]
    assert x.shape == (2, 3, 2)
    assert torch.equal(x[0], embed.weight[[5, 6, 7]])
    assert torch.equal(x[1, 0], embed.weight[49])
    assert not x[1, 1:].any()


def test_llm_ids_spell_characters_or_tokenize_the_reading():
    from conftest import char_tokenizer

    p = _probe()
    tok = char_tokenizer()
    char_ids = [100 + i for i in range(len(CHARS))]
    reads = [char_targets("ab c"), char_targets("x")]
    assert p.llm_ids(reads, "chars", tok, char_ids) == [[101, 102, 100, 103], [124]]  # CHARS starts with the space
    # through the tokenizer: the reading's text, as the LLM would read that text
    assert p.llm_ids(reads, "tokens", tok, char_ids) == [tok("ab c", add_special_tokens=False)["input_ids"],
                                                         tok("x", add_special_tokens=False)["input_ids"]]


def test_arm_files_name_the_errors_and_the_reading():
    p = _probe()
    assert p.arm_file(0.3, "chars") == "cer-0.3.json"
    assert p.arm_file(0.0, "tokens") == "tokens-cer-0.json"
    assert p.arm_file(None, "chars") == "head.json"
    assert p.arm_file(None, "tokens") == "tokens-head.json"


def test_schedule_warms_up_then_decays_to_zero():
    p = _probe()
    assert p.schedule(0, 100, 10) == pytest.approx(0.1)
    assert p.schedule(9, 100, 10) == pytest.approx(1.0)
    assert p.schedule(10, 100, 10) == pytest.approx(1.0)
    assert p.schedule(55, 100, 10) == pytest.approx(0.5)
    assert p.schedule(100, 100, 10) == 0.0


def _manifest(path, texts):
    path.write_text("".join(json.dumps({"audio": "unused.wav", "text": t}) + "\n" for t in texts))
    return str(path)


def test_a_short_clean_run_learns_and_a_finished_arm_is_kept(lm_folder, tmp_path):
    p = _probe()
    words = ["red cat", "blue dog", "green owl", "pink fox", "gray bat", "tan emu"]
    train = _manifest(tmp_path / "train.jsonl", words * 4)
    test = _manifest(tmp_path / "test.jsonl", words[:4])
    control = tmp_path / "control.txt"
    control.write_text("plain words for the control text. " * 200)
    out = tmp_path / "out"
    argv = ["--train", train, "--test", test, "--model", str(lm_folder), "--budget-params", "8k",
            "--rates", "0", "--steps", "30", "--lr", "3e-3", "--warmup", "3", "--eval-every", "15",
            "--eval-limit", "2", "--control", str(control), "--out", str(out)]
    p.main(argv)
    rec = json.loads((out / "cer-0.json").read_text())
    assert rec["input_cer_measured"] == 0.0
    assert [e["step"] for e in rec["evals"]] == [0, 15, 30]
    assert [e["clips"] for e in rec["evals"]] == [2, 2, 4]
    assert [len(e["hyps"]) for e in rec["evals"]] == [2, 2, 4] and rec["evals"][-1]["wer_plain"] >= 0
    assert rec["selected"] and all(isinstance(n, str) for n in rec["selected"])
    losses = [x["loss"] for x in rec["train_loss"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert rec["evals"][-1]["loss_right"] < rec["evals"][0]["loss_right"]
    before = (out / "cer-0.json").stat().st_mtime_ns
    p.main(argv)  # resumable: the finished arm is not run again
    assert (out / "cer-0.json").stat().st_mtime_ns == before


def test_a_peer_method_arm_trains_only_its_adapters_at_the_budget_and_learns(lm_folder, tmp_path):
    """--method lora: the PEFT wrapper is the trained model, only LoRA factors train, about the budget's
    parameter count, and the arm's record names the method instead of a tensor order."""
    import argparse

    from kappatune.models import load_model

    p = _probe()
    llm, tok = load_model(str(lm_folder))
    args = argparse.Namespace(method="lora", order="lowest", budget_params="8k", seed=0)
    model, facts = p.prepare_arm(llm, tok, args)
    trainable = {n: t.numel() for n, t in model.named_parameters() if t.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert facts["trainable_params"] == sum(trainable.values()) and 4_000 <= facts["trainable_params"] <= 12_000
    assert facts["selected"] is None and facts["method_info"]["rank"] >= 1
    words = ["red cat", "blue dog", "green owl", "pink fox", "gray bat", "tan emu"]
    control = tmp_path / "control.txt"
    control.write_text("plain words for the control text. " * 200)
    out = tmp_path / "out"
    p.main(["--train", _manifest(tmp_path / "train.jsonl", words * 4), "--test", _manifest(tmp_path / "test.jsonl",
            words[:4]), "--model", str(lm_folder), "--method", "lora", "--budget-params", "8k", "--rates", "0",
            "--steps", "30", "--lr", "1e-2", "--warmup", "3", "--eval-every", "30", "--eval-limit", "2",
            "--control", str(control), "--out", str(out)])
    rec = json.loads((out / "cer-0.json").read_text())
    assert rec["method"] == "lora" and rec["order"] is None and rec["selected"] is None
    assert rec["evals"][0]["dppl"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the base model
    assert rec["evals"][-1]["loss_right"] < rec["evals"][0]["loss_right"]


def test_compare_pairs_arms_sentence_by_sentence_on_the_pooled_wer(tmp_path, capsys):
    cmp = load_script("speech_oracle_compare")
    refs = ["the cat sat", "a dog ran far", "it rains"]
    assert cmp.sentence_errors(refs, ["the cat sat", "a dog far", ""]) == [0, 1, 2]
    # arm a misses 1 + 2 words more than arm b on two sentences, over a mean reference length of 3 words
    c = cmp.wer_contrast(refs, ["the cat", "a dog", "it rains"], ["the cat sat", "a dog ran", "it rains"])
    assert c["wer_diff"] == pytest.approx((1 + 1 + 0) / 3 / 3)
    assert c["sentences"] == 3 and c["low"] < c["wer_diff"] < c["high"]
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"text": t}) + "\n" for t in refs))

    def arm(name, hyps, wer, **facts):
        path = tmp_path / f"{name}.json"
        ev = {"step": 300, "clips": 3, "wer": wer, "gap": 1.0, "dppl": 2.0}
        if hyps is not None:
            ev["hyps"] = hyps
        rec = {"order": name, "seed": 0, "lr": 5e-4, "selected": ["w"], "evals": [ev]}
        path.write_text(json.dumps(dict(rec, **facts)))
        return f"{name}={path}"

    out = tmp_path / "cmp.json"
    peer = arm("lora", ["the cat sat", "a dog ran", "it rains"], 0.1, order=None, method="lora", selected=None,
               method_info={"rank": 8})
    cmp.main(["--test", str(test), "--reference", "lowest", "-o", str(out),
              arm("lowest", refs, 0.0), arm("worse", ["x", "y", "z"], 1.0), arm("old", None, 0.5), peer])
    rows = {r["arm"]: r for r in json.loads(out.read_text())["arms"]}
    assert rows["worse"]["vs_reference"]["wer_diff"] == pytest.approx(1.0)  # every word wrong, none extra
    assert "vs_reference" not in rows["old"] and "vs_reference" not in rows["lowest"]
    assert rows["lora"]["trained"] == "lora r8" and rows["lowest"]["trained"] == "1 tensor"
    assert rows["lora"]["vs_reference"]["wer_diff"] == pytest.approx(1 / 3 / 3)  # one word missed of 3 x 3
    shown = capsys.readouterr().out
    assert "| worse |" in shown and "| lora | lora r8 |" in shown
    with pytest.raises(SystemExit, match="--reference nope"):
        cmp.main(["--test", str(test), "--reference", "nope", arm("lowest", refs, 0.0)])
