"""scripts/make_speech_data.py's plan: held-out sentences never reach training, and the unseen-voice test set is
the held-out set again with only the voice changed (so a WER difference between the two is the voice's)."""

import importlib.util
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("make_speech_data",
                                                  os.path.join(ROOT, "scripts", "make_speech_data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plan_holds_out_sentences_and_pairs_the_unseen_voice_with_the_test_set():
    mod = _script()
    texts = [f"sentence number {i} is here." for i in range(60)]
    voices = ["en-us+m1", "en-gb+f1", "en-gb-scotland+m2"]
    rows = mod.plan(texts, 10, voices, "en-029+m7", [140, 200], [30, 70], seed=3)
    train, test, unseen = rows["train"], rows["test"], rows["test_unseen"]
    assert len(train) == 50 and len(test) == len(unseen) == 10
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert [r["text"] for r in test] == [r["text"] for r in unseen]
    assert all(r["voice"] == "en-029+m7" for r in unseen)
    assert [(r["speed"], r["pitch"]) for r in test] == [(r["speed"], r["pitch"]) for r in unseen]
    assert {r["voice"] for r in train + test} <= set(voices) and len({r["voice"] for r in train}) == 3
    assert {r["speed"] for r in train} == {140, 200} and {r["pitch"] for r in train} == {30, 70}
    assert len({r["clip"] for part in rows.values() for r in part}) == 70  # one file per clip
    assert rows == mod.plan(texts, 10, voices, "en-029+m7", [140, 200], [30, 70], seed=3)  # deterministic


@pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("sox") is None,
                    reason="espeak-ng / sox not installed")
def test_speak_writes_a_16k_mono_wav_and_nothing_half_written(tmp_path):
    import wave

    mod = _script()
    wav = str(tmp_path / "a.wav")
    mod.speak("a short test sentence.", wav, "en-gb+f1", 175, 50)
    with wave.open(wav) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2) and w.getnframes() > 8000
    with pytest.raises(Exception):
        mod.speak("x", str(tmp_path / "b.wav"), "xx-nope", 175, 50)
    assert sorted(os.listdir(tmp_path)) == ["a.wav"]


def test_renderings_add_other_voices_and_leave_the_first_renderings_and_test_sets_unchanged():
    mod = _script()
    texts = [f"sentence number {i} is here." for i in range(40)]
    voices = ["en-us+m1", "en-gb+f1", "en-gb-scotland+m2", "en-us+f2"]
    args = (texts, 10, voices, "en-029+m7", [140, 200], [30, 70])
    one, three = mod.plan(*args, seed=5), mod.plan(*args, seed=5, renderings=3)
    assert three["test"] == one["test"] and three["test_unseen"] == one["test_unseen"]
    assert three["train"][:30] == one["train"] and len(three["train"]) == 90
    by_text: dict[str, list[str]] = {}
    for r in three["train"]:
        by_text.setdefault(r["text"], []).append(r["voice"])
    assert all(len(v) == 3 and len(set(v)) == 3 for v in by_text.values())  # three different voices each
    assert not set(by_text) & {r["text"] for r in one["test"]}
    assert len({r["clip"] for r in three["train"]}) == 90
    assert three == mod.plan(*args, seed=5, renderings=3)
    with pytest.raises(SystemExit, match="--renderings"):
        mod.plan(*args, seed=5, renderings=5)


def test_within_seconds_leaves_out_exactly_the_longer_clips(tmp_path):
    import wave

    mod = _script()
    for name, seconds in (("a", 1.0), ("b", 2.5), ("c", 2.0)):
        with wave.open(str(tmp_path / f"{name}.wav"), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
            w.writeframes(b"\0\0" * int(seconds * 16000))
    rows = [{"clip": n} for n in "abc"]
    assert mod.within_seconds(rows, str(tmp_path), 2.0) == ([{"clip": "a"}, {"clip": "c"}], 1)
