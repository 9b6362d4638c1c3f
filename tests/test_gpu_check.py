"""benchmarks/gpu_check.sh on a CPU-only machine: it runs what it can (the scan against PEFT's helper and the
training check with its frozen-tensor proof, both on the CPU) and names what it skipped."""

import os
import re
import subprocess

import pytest
import torch

pytest.importorskip("peft")

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_gpu_check_runs_on_cpu_and_says_what_it_skipped(lm_folder):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--model", str(lm_folder),
                        "--steps", "2", "--budget", "3000", "--repeat", "1"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("gpu_check: ")]
    text = "\n".join(lines)
    ratio = re.search(r"scan on CPU \(no CUDA\), PEFT find_kappa_target_modules / kappatune.scan .*: ([\d.]+)x", text)
    assert ratio and float(ratio.group(1)) > 0
    error = re.search(r"worst relative kappa error vs float64 SVD \((\d+) units\): ([\d.e+-]+)", text)
    assert error and int(error.group(1)) > 0 and float(error.group(2)) < 1e-6
    assert re.search(r"train 2 steps on CPU fp32 \(no CUDA\), frozen tensors bit-identical: True \(([1-9]\d*) "
                     r"trained tensors moved", text)
    assert "SKIPPED scan on CUDA" in text and "SKIPPED train in bf16 on CUDA" in text
    assert not any(ln.startswith(("gpu_check: scan, peak GPU", "gpu_check: train, peak GPU")) for ln in lines)
