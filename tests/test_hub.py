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
