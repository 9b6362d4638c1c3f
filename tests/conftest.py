"""Tiny seeded models built from configs (no download), shared by the tests."""

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ARCHS = {
    "llama": dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "gpt2": dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "olmoe": dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(vocab_size=64, hidden_size=32, intermediate_size=24, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
    "mixtral": dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
}


def make_model(arch: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(arch, **ARCHS[arch])
    cfg.eos_token_id = cfg.bos_token_id = cfg.pad_token_id = 0
    m = AutoModelForCausalLM.from_config(cfg)
    # Give every weight a random spread of singular values (init can be near-orthogonal or constant).
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn_like(p) * torch.rand(p.shape[-1]) * 0.1)
    return m.eval()


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv1d(3, 8, 5)
        self.conv2 = torch.nn.Conv2d(8, 12, (3, 2))
        self.conv3 = torch.nn.Conv3d(12, 6, (2, 2, 2))
        self.bn = torch.nn.BatchNorm2d(12)
        self.fc = torch.nn.Linear(6, 4)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KAPPATUNE_CACHE_DIR", str(tmp_path / "kt-cache"))
    monkeypatch.setenv("KAPPATUNE_SPEECH_CACHE_DIR", str(tmp_path / "kt-speech-cache"))
    monkeypatch.setenv("KAPPATUNE_CORDA_CACHE", str(tmp_path / "kt-corda-cache"))
    monkeypatch.setenv("KAPPATUNE_TEXT_CACHE", str(tmp_path / "kt-text-cache"))


SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def load_script(name: str):
    """scripts/NAME.py imported as a module (the scripts folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def np_kappa(mat) -> float:
    s = np.linalg.svd(np.asarray(mat, dtype=np.float64), compute_uv=False)
    return float(s[0] / s[-1])


def char_tokenizer(bos: bool = False):
    """A character-level fast tokenizer built locally (no download): ids 0-2 special, then printable chars.
    ``bos``: it puts <s> before every text by default, as Gemma's and Llama's tokenizers do."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(string.printable))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def make_lm(arch: str = "llama", seed: int = 0, **over):
    """Tiny causal LM + char tokenizer that fit each other."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = char_tokenizer()
    kw = dict(ARCHS[arch])
    kw.update(vocab_size=len(tok), **over)
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(arch, **kw)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 1, 2
    return AutoModelForCausalLM.from_config(cfg), tok


@pytest.fixture
def lm_folder(tmp_path):
    m, tok = make_lm()
    m.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    return tmp_path / "lm"


def toy_rows(n=24, seed=0):
    import random

    rng = random.Random(seed)
    pos = ["good day", "love it", "great fun", "nice one", "so happy"]
    neg = ["bad day", "hate it", "awful mess", "so sad", "terrible"]
    rows = []
    for i in range(n):
        lab = "positive" if i % 2 == 0 else "negative"
        rows.append({"text": rng.choice(pos if lab == "positive" else neg), "label": lab})
    return rows


# ---- helpers shared by several test modules -------------------------------------------------------
def run(*args, cwd=None, env=None):
    """The kappatune command (the installed entry point, else python -m kappatune); returns the finished process."""
    exe = shutil.which("kappatune")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "kappatune", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300, env=env)


def run_torchrun(*args, env=None, timeout=300):
    """``torchrun --standalone --nproc_per_node=2 ARGS``: a free rendezvous port each time (fixed ports can
    collide between runs), and a hang is killed rather than waited out. torch's gloo teardown can very rarely
    hang a worker after the work is done (CI saw it once in many runs, never reproduced in 25 runs here, under
    load or not); so a timed-out launch is retried once, after its workers' Python stacks are printed
    (faulthandler on SIGABRT) for the record. A second hang, or any non-zero exit, is the result returned."""
    import warnings

    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(exe):
        exe = shutil.which("torchrun")
    if exe is None:
        pytest.skip("torchrun not on PATH")
    env = dict(env if env is not None else os.environ, PYTHONFAULTHANDLER="1")
    cmd = [exe, "--standalone", "--nproc_per_node=2", *args]
    for attempt in (1, 2):
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
            return subprocess.CompletedProcess(cmd, p.returncode, out, err)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGABRT)  # faulthandler prints each worker's stack on SIGABRT
            try:
                out, err = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                out, err = p.communicate()
            if attempt == 2:
                return subprocess.CompletedProcess(cmd, -9, out, f"hung twice (>{timeout}s):\n{err}")
            warnings.warn(f"torchrun hung past {timeout}s; retrying once. Last stderr:\n{err[-3000:]}")
    raise AssertionError("unreachable")


def worker_failure(stderr, tail=3000):
    """What to show when a torchrun launch fails: a worker's "Fatal Python error" block (faulthandler prints
    the cause and the Python stack first, then a long list of extension modules that pushes them out of any
    plain tail), followed by the tail of stderr."""
    lines = stderr.splitlines()
    fatal = [i for i, ln in enumerate(lines) if "Fatal Python error" in ln]
    head = []
    for i in fatal[:2]:
        block = lines[i:i + 40]
        head += [ln for ln in block if "Extension modules:" not in ln] + ["..."]  # workers' lines may be prefixed
    return "\n".join(head) + "\n" + stderr[-tail:]


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kappatune: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


class InterruptAt(TrainerCallback):
    """Sends SIGINT (what Ctrl-C does) to this process at one optimizer step."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does
