"""train-speech --recipe: the paper's recipe is the library's defaults, 'listen' (the default on the command
line) fills what the user did not set, and an explicit option always wins."""

import json

import pytest

from kappatune.errors import KappaTuneError
from kappatune.multimodal.recipe import SpeechRun
from kappatune.multimodal.speech_train import SpeechTrainConfig
from kappatune.speech_recipes import DEFAULT_RECIPE, RECIPES, recipe_settings


def test_the_paper_recipe_is_what_the_library_defaults_to():
    loop, run = SpeechTrainConfig(), SpeechRun(model="m", manifest="t", output="o")
    paper = recipe_settings("paper")
    assert {k: getattr(loop, k) for k in ("lr", "adaptor_lr", "batch_size", "warmup_steps", "ctc_weight",
                                            "ctc_steps")} == {k: paper[k] for k in ("lr", "adaptor_lr", "batch_size",
                                                                                    "warmup_steps", "ctc_weight",
                                                                                    "ctc_steps")}
    assert (run.adaptor_out_norm, run.adaptor_bridge) == (paper["adaptor_out_norm"], paper["adaptor_bridge"])


def test_explicit_settings_win_and_a_shared_stage_replaces_the_recipes_own():
    listen = recipe_settings("listen")
    assert DEFAULT_RECIPE == "listen" and listen["adaptor_bridge"] == "chars" and listen["ctc_steps"] == 3000
    assert listen["ctc_weight"] > 0 and listen["adaptor_out_norm"] is True
    mixed = recipe_settings("listen", lr=1e-5, adaptor_out_norm=False, batch_size=None)
    assert mixed["lr"] == 1e-5 and mixed["adaptor_out_norm"] is False and mixed["batch_size"] == listen["batch_size"]
    assert recipe_settings("listen", ctc_stage_from="runs/x")["ctc_steps"] == 0
    assert recipe_settings("listen", ctc_stage_from="runs/x", ctc_steps=5)["ctc_steps"] == 5  # refused later
    with pytest.raises(KappaTuneError, match="unknown speech recipe 'fast'"):
        recipe_settings("fast")
    with pytest.raises(KappaTuneError, match="not a recipe setting: epochs"):
        recipe_settings("paper", epochs=2)
    assert set(RECIPES) == {"paper", "listen"}


def test_train_speech_defaults_to_the_listening_recipe_through_the_cli(tmp_path, lm_folder):
    from transformers import WhisperModel

    from conftest import run
    from test_multimodal import _tiny_encoder, _wav_manifest

    enc_dir = tmp_path / "whisper"
    WhisperModel(_tiny_encoder().config).save_pretrained(enc_dir)
    train = _wav_manifest(tmp_path, ["go left", "stop now"], "train.jsonl")
    common = ("train-speech", str(lm_folder), "--manifest", str(train), "--encoder", str(enc_dir), "--budget-params",
              "0", "--max-steps", "1", "--control", "none", "--adaptor-heads", "4", "--ctc-steps", "3")
    r = run(*common, "-o", str(tmp_path / "listen"))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    saved = json.loads((tmp_path / "listen" / "model" / "adaptor.json").read_text())
    assert saved["out_norm"] is True and len(saved["bridge_ids"]) == 38 and saved["ctc_weight"] == 1.0
    loop = json.loads((tmp_path / "listen" / "speech_train.json").read_text())["config"]
    assert res["ctc_stage"]["steps"] == 3 and loop["batch_size"] == 8 and loop["lr"] == 5e-4
    r = run(*common, "--no-adaptor-out-norm", "--adaptor-bridge", "none", "-o", str(tmp_path / "mixed"))
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "mixed" / "model" / "adaptor.json").read_text())
    assert saved["out_norm"] is False and saved["bridge_ids"] is None
