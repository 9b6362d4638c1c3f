"""scripts/speech_paired.py: paired intervals between speech runs over test clips and control chunks."""

import importlib.util
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _paired():
    spec = importlib.util.spec_from_file_location("speech_paired", os.path.join(ROOT, "scripts", "speech_paired.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(gaps, nll):
    return {"clips": {"gap": gaps}, "control_nll": nll}


def test_contrasts_pair_clips_and_chunks_with_the_reference():
    """A run whose every clip gap is the reference's + 0.1 (+- 0.01) is separated by a paired interval even
    though the clips' own gaps vary far more; forgetting is each chunk's NLL minus the base's, paired the same way."""
    mod = _paired()
    ref_gaps = [0.0, 1.0, 2.0, 3.0]
    base = [3.0, 3.5, 4.0, 4.5]
    runs = {"lowest": _run(ref_gaps, [b + 0.2 for b in base]),
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
    want = math.exp(sum(base) / 4 + 0.2) - math.exp(sum(base) / 4)
    assert s["runs"]["lowest"]["dppl_same_chunks"] == pytest.approx(want)


def test_a_contrast_inside_the_noise_is_not_separated():
    mod = _paired()
    base = [3.0, 3.1, 3.2]
    runs = {"a": _run([0.1, 0.2, 0.3], base), "b": _run([0.3, 0.1, 0.2], base)}
    c = mod.summarise(runs, base, "a")["contrasts"]["b - a"]["audio_gap"]
    assert c["mean"] == pytest.approx(0.0, abs=1e-12) and c["verdict"] == "not separated at this power"
