"""The real `kappatune` entry point, in a subprocess, including bad input."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import make_model, one_line_error, run


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    make_model("llama").save_pretrained(d / "llama")
    return d / "llama"


def test_version_is_fast():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("kappatune ")


def test_scan_show_select_end_to_end(saved, tmp_path):
    rep = tmp_path / "r.json"
    r = run("scan", str(saved), "-o", str(rep), "--csv", str(tmp_path / "r.csv"), "--no-progress")
    assert r.returncode == 0, r.stderr
    d = json.loads(rep.read_text())
    assert d["format"] == "kappatune.report/1" and len(d["units"]) == 14
    assert (tmp_path / "r.csv").read_text().count("\n") == 15
    r = run("show", str(rep), "--top", "3")
    assert r.returncode == 0 and "per kind" in r.stdout and "skipped tensors by reason" in r.stdout
    assert "normalisation" in r.stdout
    out = tmp_path / "s.json"
    r = run("select", str(rep), "--budget-params", "3k", "-o", str(out), "--peft", str(tmp_path / "p.json"),
            "--axolotl", str(tmp_path / "a.yaml"), "--csv", str(tmp_path / "s.csv"))
    assert r.returncode == 0, r.stderr
    s = json.loads(out.read_text())
    assert s["total_params"] <= 3000 and s["count"] >= 1
    assert json.loads((tmp_path / "p.json").read_text())["target_modules"]
    assert "unfrozen_parameters" in (tmp_path / "a.yaml").read_text()
    # random-same-kind via --like
    r = run("select", str(rep), "--order", "random-same-kind", "--like", str(out), "--count", str(s["count"]))
    assert r.returncode == 0, r.stderr
    kinds = sorted(u["kind"] for u in json.loads(r.stdout)["units"])
    assert kinds == sorted(u["kind"] for u in s["units"])


def test_missing_path(tmp_path):
    out = tmp_path / "r.json"
    r = run("scan", str(tmp_path / "nope"), "-o", str(out))
    one_line_error(r, "no such file")
    assert not out.exists()


def test_truncated_and_corrupt_safetensors(saved, tmp_path):
    data = (saved / "model.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    for name in ("trunc.safetensors", "junk.safetensors"):
        out = tmp_path / f"{name}.json"
        r = run("scan", str(tmp_path / name), "-o", str(out), "--no-progress")
        one_line_error(r, name)
        assert not out.exists()


def test_no_eligible_tensor(tmp_path):
    from safetensors.torch import save_file

    save_file({"norm.weight": torch.ones(4), "x.bias": torch.zeros(4)}, str(tmp_path / "n.safetensors"))
    r = run("scan", str(tmp_path / "n.safetensors"), "-o", str(tmp_path / "o.json"))
    one_line_error(r, "no eligible")
    assert not (tmp_path / "o.json").exists()


def test_select_bad_inputs(saved, tmp_path):
    rep = tmp_path / "r.json"
    assert run("scan", str(saved), "-o", str(rep), "--no-progress").returncode == 0
    out = tmp_path / "s.json"
    one_line_error(run("select", str(rep), "--budget-params", "50M", "-o", str(out)), "larger than")
    one_line_error(run("select", str(rep), "--count", "2", "--include", "q_proj", "-o", str(out)), "matches no unit")
    one_line_error(run("select", str(tmp_path / "missing.json"), "--count", "2", "-o", str(out)), "no such")
    one_line_error(run("select", str(rep), "--count", "abc", "-o", str(out)), "abc")
    assert not out.exists()


def test_slice_export_refused_leaves_no_files(tmp_path):
    make_model("olmoe").save_pretrained(tmp_path / "moe")
    rep = tmp_path / "r.json"
    assert run("scan", str(tmp_path / "moe"), "-o", str(rep), "--no-progress").returncode == 0
    out, ax = tmp_path / "s.json", tmp_path / "a.yaml"
    r = run("select", str(rep), "--count", "3", "--group", "expert", "-o", str(out), "--axolotl", str(ax))
    one_line_error(r, "one expert")
    assert not out.exists() and not ax.exists()


def test_cli_imports_no_torch_for_help_and_version():
    code = ("import sys; from kappatune.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "False"
    from kappatune.cli import LORA_TARGETS_HELP
    from kappatune.train import LORA_DEFAULT_TARGETS

    assert LORA_TARGETS_HELP == ",".join(LORA_DEFAULT_TARGETS)
    from kappatune.cli.train import METHOD_NAMES
    from kappatune.methods import METHODS

    assert sorted(METHOD_NAMES) == sorted(METHODS)  # --method's help names exactly the registered methods


def test_cli_reference_is_up_to_date():
    """docs/cli.md is generated from the parser; a changed option must regenerate it."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gen_cli_docs.py"
    r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_figures_quoted_in_several_documents_agree_with_their_one_source(tmp_path):
    """Every <!--fig:NAME--> quote in README.md and docs/*.md equals docs/figures.json; the check also catches a
    stale quote (shown on a copy of the docs with one figure changed)."""
    import shutil
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = root / "scripts" / "sync_figures.py"
    r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    copy = tmp_path / "repo"
    for rel in ("README.md", "docs", "scripts/sync_figures.py"):
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (root / rel).is_dir() else shutil.copy)(root / rel, copy / rel)
    readme = (copy / "README.md").read_text()
    (copy / "README.md").write_text(readme.replace("<!--fig:scan_kappa_error-->7e-12", "<!--fig:scan_kappa_error-->1e-3"))
    r = subprocess.run([sys.executable, str(copy / "scripts" / "sync_figures.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 1 and "README.md: scan_kappa_error is '1e-3'" in r.stderr
    subprocess.run([sys.executable, str(copy / "scripts" / "sync_figures.py")], check=True)  # rewrites from the JSON
    assert (copy / "README.md").read_text() == readme


def test_help_is_user_facing_and_torch_free():
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "kappatune", "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0
    assert not [ln for ln in r.stderr.splitlines() if "torch" in ln.split("|")[-1]]  # importtime lines
    assert "without destroying what it already knows" in r.stdout and "example:" in r.stdout
    assert "one library function" not in r.stdout  # not the developer docstring


def test_every_command_help_has_an_example(capsys):
    from kappatune.cli import build_parser

    for cmd in ("scan", "show", "select", "train", "eval", "demo", "compare", "train-speech", "eval-speech"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "--help"])
        out = capsys.readouterr().out
        assert f"example:\n  kappatune {cmd} " in out, cmd


def test_order_choices_come_from_the_registry(monkeypatch):
    """A newly registered order is accepted by every command that takes --order, with no CLI edit."""
    from kappatune.cli import build_parser
    from kappatune.policies import ORDERS, Order

    monkeypatch.setitem(ORDERS, "by-name", Order("by-name", lambda units, ctx: sorted(units, key=lambda u: u.name),
                                                 "alphabetical (test only)"))
    p = build_parser()
    for name in ORDERS:
        assert p.parse_args(["select", "r.json", "--count", "1", "--order", name]).order == name
        assert p.parse_args(["train-speech", "m", "--manifest", "t.jsonl", "-o", "o", "--order", name]).order == name
    with pytest.raises(SystemExit):
        p.parse_args(["select", "r.json", "--count", "1", "--order", "no-such-order"])


def test_select_options_mirror_select_config(tmp_path):
    """Every SelectConfig field is a select option, and parsed options build the same config as the API."""
    import dataclasses

    from kappatune.cli import build_parser
    from kappatune.cli.select import config_from_args
    from kappatune.policies import SelectConfig

    a = build_parser().parse_args(["select", "r.json", "--budget-params", "1.5k", "--order", "highest", "--seed",
                                   "3", "--include", "a.*", "--include", "b.*", "--exclude", "c.*", "--kind", "v_proj",
                                   "--group", "mlp", "--max-per-kind", "2", "--allow-singular"])
    got = config_from_args(a)
    want = SelectConfig(budget_params=1500, order="highest", seed=3, include=["a.*", "b.*"], exclude=["c.*"],
                        kinds=["v_proj"], groups=["mlp"], max_per_kind=2, allow_singular=True)
    assert got == want
    assert {f.name for f in dataclasses.fields(SelectConfig)} <= set(vars(a))
