"""KappaTune inside TRL's SFTTrainer (examples/trl_sft.py): frozen tensors stay bit-identical, trained ones move,
for a dense selection, a MoE selection trained by expert rows, and KappaTune-LoRA through ``peft_config``."""

import importlib.util
import os

import pytest
import torch

from conftest import make_lm

pytest.importorskip("trl")
pytest.importorskip("peft")

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "trl_sft.py")


def _example():
    spec = importlib.util.spec_from_file_location("trl_sft_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_folder(tmp_path, arch):
    model, tok = make_lm(arch)
    folder = tmp_path / arch
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, {n: p.detach().clone() for n, p in model.named_parameters()}


def _run(folder, tmp_path, *extra):
    return _example().main(["--model", str(folder), "--steps", "3", "--examples", "24", "--lr", "5e-2",
                            "--output", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_sft_trainer_with_a_selection_moves_only_the_selection(arch, tmp_path):
    from kappatune.freeze import applied_to

    folder, before = _tiny_folder(tmp_path, arch)
    trainer = _run(folder, tmp_path, "--budget", "3000")
    handle = applied_to(trainer.model)
    assert _example().guard_of(trainer).verified is True
    after = dict(trainer.model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert moved and moved <= set(handle.trainable_names)  # something trained, and only what was selected
    for name, rows in handle.slice_rows.items():  # fused experts: only the selected experts' rows moved
        old = before[name].reshape(-1, before[name].shape[-1])
        new = after[name].detach().reshape(old.shape)
        keep = torch.ones(old.shape[0], dtype=torch.bool)
        keep[rows] = False
        assert torch.equal(old[keep], new[keep]) and not torch.equal(old[~keep], new[~keep])
    if arch == "qwen2_moe":
        assert handle.slice_rows, "the MoE case should exercise expert-row training"


def test_sft_trainer_with_kappatune_lora_keeps_the_base_weights(tmp_path):
    import kappatune
    from kappatune.integrations.peft import kappatune_lora_config

    folder, before = _tiny_folder(tmp_path, "llama")
    trainer = _run(folder, tmp_path, "--lora", "--budget", "3000")
    assert _example().guard_of(trainer).verified is True
    _, info = kappatune_lora_config(kappatune.scan(str(folder)), budget_params=3000)
    params = dict(trainer.model.named_parameters())
    lora = {n: p for n, p in params.items() if "lora_" in n}
    assert sum(p.numel() for p in lora.values()) == info["expected_params"]
    adapted = {n.split(".lora_")[0].replace("base_model.model.", "") for n in lora}
    assert adapted == set(info["target_modules"])
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # B starts at zero: it trained
    for n, p in params.items():
        if "lora_" not in n:
            base = n.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(before[base], p.detach()), base


@pytest.mark.slow
def test_trl_example_on_smollm2(tmp_path):
    """The example as a user runs it, on the real SmolLM2-135M demo asset."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, EXAMPLE, "--steps", "4", "--examples", "32", "--output", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "frozen tensors bit-identical: True" in r.stdout
