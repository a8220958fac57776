"""bench/gpu_check.sh runs where no GPU is: its CPU mode goes through every phase, so it cannot rot
between the rare machines that have one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_quick_on_cpu_writes_only_logs_and_one_summary(tmp_path):
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    tmp.mkdir()
    (out / "gpu_check.json").write_text("stale")  # from an earlier run: replaced, not appended to
    env = os.environ | {"OUT": str(out), "PY": sys.executable, "TMPDIR": str(tmp)}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--device", "cpu", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["device.log", "gpu_check.json", "make-data.log", "seed-arm.log", "throughput.log"]
    assert not list(tmp.glob("imgcls-gpu-check.*")), "its data, cache and runs (under the temp folder) are removed at the end"
    s = json.loads((out / "gpu_check.json").read_text())
    assert s["ok"] and s["quick"] and s["device"] == "cpu"
    assert s["data"]["images"] == 88  # 6 classes x (12 train + 2-3 test) at --scale 0.01
    tp = s["throughput"]
    assert tp["model"] == "resnet18" and tp["img_per_s"]["imgcls"] > 0 and tp["img_per_s"]["ready"] > 0
    assert set(s["sync_check"]["presets"]) == {"none", "flip", "flip-rotate", "rrc", "randaugment", "strong"}
    assert s["presets_failed"] == [] and s["sync_waits"] == 0  # no sync debug mode on a CPU: nothing to count
    arm = s["seed_arm"]
    assert arm["exit"] == 0 and arm["epochs"] == 1 and 0 <= arm["test_acc"] <= 1 and arm["wall_s"] > 0
    assert arm["cache"].startswith("warm")  # the CLI found the cache the throughput phase decoded


def test_gpu_check_refuses_cuda_without_a_gpu_and_unknown_arguments(tmp_path):
    import torch

    env = os.environ | {"OUT": str(tmp_path / "out"), "PY": sys.executable, "TMPDIR": str(tmp_path)}
    bad = subprocess.run(["bash", "bench/gpu_check.sh", "--fast"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument --fast" in bad.stderr
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA GPU here" in proc.stderr
