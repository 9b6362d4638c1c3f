"""scripts/speech_paired.py: paired intervals between speech runs over test clips and control chunks."""

import math
import os

import pytest
from conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _paired():
    return load_script("speech_paired")


def _run(gaps, nll):
    return {"clips": {"gap": gaps}, "control_nll": nll}


def test_contrasts_pair_clips_and_chunks_with_the_reference():
    """A run whose every clip gap is the reference's + 0.1 (+- 0.01) is separated by a paired interval even
    though the clips' own gaps vary far more; forgetting is each chunk's NLL minus the base's, paired the same way."""
    mod = _paired()
    ref_gaps = [0.0, 1.0, 2.0, 3.0]
    base = [3.0, 3.5, 4.0, 4.5]
    shift = [0.15, 0.25, 0.18, 0.22]  # the lowest run's forgetting varies by chunk: only pairing removes it
    runs = {"lowest": _run(ref_gaps, [b + d for b, d in zip(base, shift)]),
            "highest": _run([g + 0.1 + d for g, d in zip(ref_gaps, (0.01, -0.01, 0.01, -0.01))], list(base))}
    s = mod.summarise(runs, base, "lowest")
    assert list(s["contrasts"]) == ["highest - lowest"]
    gap = s["contrasts"]["highest - lowest"]["audio_gap"]
    assert gap["mean"] == pytest.approx(0.1)
    assert gap["verdict"] == "separated" and gap["low"] > 0.07 and gap["high"] < 0.13
    lone = s["runs"]["lowest"]["audio_gap"]  # the gap alone varies over clips: its own interval is wide
    assert lone["mean"] == pytest.approx(1.5) and lone["low"] < 0 < lone["high"]
    assert s["runs"]["lowest"]["forgetting_nll"]["mean"] == pytest.approx(0.2)
    assert s["runs"]["highest"]["forgetting_nll"]["mean"] == pytest.approx(0.0)
    forg = s["contrasts"]["highest - lowest"]["forgetting_nll"]
    assert forg["mean"] == pytest.approx(-0.2) and forg["verdict"] == "separated"
    assert gap["unit"] == "clip" and forg["unit"] == "chunk"
    tokens_weighted = s["runs"]["lowest"]["audio_gap_token_weighted"]
    assert tokens_weighted == pytest.approx(1.5)  # no token counts given: every clip weighs the same
    want = math.exp((sum(base) + sum(shift)) / 4) - math.exp(sum(base) / 4)
    assert s["runs"]["lowest"]["dppl_same_chunks"] == pytest.approx(want)


def test_a_contrast_inside_the_noise_is_not_separated():
    mod = _paired()
    base = [3.0, 3.1, 3.2]
    runs = {"a": _run([0.1, 0.2, 0.3], base), "b": _run([0.3, 0.1, 0.2], base)}
    c = mod.summarise(runs, base, "a")["contrasts"]["b - a"]["audio_gap"]
    assert c["mean"] == pytest.approx(0.0, abs=1e-12) and c["verdict"] == "not separated at this power"


def _args(tmp_path, **kw):
    import argparse

    a = dict(runs=[str(tmp_path / "lowest-seed0"), str(tmp_path / "highest-seed0")], reference="lowest-seed0",
             test=str(tmp_path / "test.jsonl"), control=str(tmp_path / "control.txt"), base="smollm2", chunks=8,
             output=str(tmp_path / "out.json"))
    a.update(kw)
    return argparse.Namespace(**a)


@pytest.mark.parametrize("change, message", [
    ({"runs": ["a/x-seed0", "b/x-seed0"], "reference": "x-seed0"}, "share a folder name"),
    ({"reference": "random-seed0"}, "not among the runs"),
    ({"chunks": 1}, "--chunks must be at least 2"),
    ({"output": "."}, "is a folder"),
    ({"test": "missing.jsonl"}, "missing.jsonl"),
])
def test_bad_arguments_are_refused_before_any_model_loads(tmp_path, change, message):
    from kappatune.errors import KappaTuneError

    with pytest.raises(KappaTuneError, match=message):
        _paired()._checked_inputs(_args(tmp_path, **change))


def test_a_one_clip_manifest_and_a_run_without_a_model_are_refused(tmp_path):
    import json

    from kappatune.errors import KappaTuneError

    mod = _paired()
    (tmp_path / "a.wav").write_bytes(b"")
    row = json.dumps({"audio": "a.wav", "text": "hello"})
    (tmp_path / "test.jsonl").write_text(row + "\n")
    (tmp_path / "control.txt").write_text("some control text " * 50)
    with pytest.raises(KappaTuneError, match="1 clip"):
        mod._checked_inputs(_args(tmp_path))
    (tmp_path / "test.jsonl").write_text(row + "\n" + row + "\n")
    with pytest.raises(KappaTuneError, match="adaptor.json"):  # the runs' folders hold no trained model
        mod._checked_inputs(_args(tmp_path))


def test_the_script_exits_with_one_line_on_bad_input(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "speech_paired.py"), "a/x", "b/x",
                           "--reference", "x", "--test", "t.jsonl", "-o", str(tmp_path / "o.json")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["speech_paired.py: two runs share a folder name in ['x', 'x']: "
                                                "results are keyed by it"]
    assert not (tmp_path / "o.json").exists()
