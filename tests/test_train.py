"""The training loop: exact resume, signals, NaN guard, early stopping, knobs."""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import imgcls.engine.train as train_mod
from imgcls.config import TrainConfig
from imgcls.engine import checkpoint as ckpt
from imgcls.engine.train import Interrupted, train
from imgcls.errors import ImgclsError
from imgcls.models import build_model, count_norms
from conftest import run_cli


def _cfg(data, **kw) -> TrainConfig:
    base = dict(
        data=str(data), model="resnet18", img_size=32, epochs=3, batch_size=8, precision="fp32",
        dropout=0.2, augment="flip-rotate", ema=0.9, lr=3e-3,
    )
    return TrainConfig(**(base | kw))


def _weights(run_dir, which="last"):
    tensors, _ = ckpt.load(run_dir / "checkpoints" / f"{which}.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema."))}


class _StopAfter(dict):
    """A stop flag that reads as SIGTERM from the n-th check on (the loop checks once per step)."""

    def __init__(self, n):
        super().__init__(signum=None)
        self.n = n

    def __getitem__(self, key):
        self.n -= 1
        return signal.SIGTERM if self.n < 0 else None


def test_resume_matches_uninterrupted_run_bit_for_bit(split_root, tmp_path, monkeypatch):
    cfg = _cfg(split_root)
    train(cfg, run_dir=tmp_path / "straight")

    @contextmanager
    def stop_mid_epoch_two():
        yield _StopAfter(7)  # 6 steps per epoch here: stops inside epoch 2

    monkeypatch.setattr(train_mod, "stop_on_signals", stop_mid_epoch_two)
    with pytest.raises(Interrupted):
        train(cfg, run_dir=tmp_path / "resumed")
    monkeypatch.undo()
    _, meta = ckpt.load(tmp_path / "resumed" / "checkpoints" / "last.safetensors")
    assert meta["position"]["epoch"] == 1 and meta["position"]["step_in_epoch"] > 0
    train(cfg, run_dir=tmp_path / "resumed", resume=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = (tmp_path / "resumed" / "metrics.csv").read_text().splitlines()
    assert len(lines) == 4  # header + 3 epochs, none repeated


def test_different_seeds_differ_same_seed_repeats(split_root, tmp_path):
    train(_cfg(split_root, epochs=1), run_dir=tmp_path / "a")
    train(_cfg(split_root, epochs=1), run_dir=tmp_path / "b")
    train(_cfg(split_root, epochs=1, seed=1), run_dir=tmp_path / "c")
    a, b, c = (_weights(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_nan_loss_stops_before_overwriting_a_good_checkpoint(split_root, tmp_path, monkeypatch):
    calls = {"n": 0}

    class NanAfterFirstEpoch(nn.CrossEntropyLoss):
        def forward(self, logits, y):
            calls["n"] += 1
            loss = super().forward(logits, y)
            return loss * float("nan") if calls["n"] > 7 else loss

    monkeypatch.setattr(train_mod.nn, "CrossEntropyLoss", NanAfterFirstEpoch)
    run = tmp_path / "run"
    with pytest.raises(ImgclsError, match="NaN"):
        train(_cfg(split_root), run_dir=run)
    _, meta = ckpt.load(run / "checkpoints" / "last.safetensors")
    assert meta["position"]["epoch"] == 1  # the epoch-1 checkpoint survived
    _, best = ckpt.load(run / "checkpoints" / "best.safetensors")
    assert best["epoch"] == 1


def test_early_stopping(split_root, tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod.Trainer, "validate", lambda self: (1.0, 0.5))  # never improves after epoch 1
    result, _ = train(_cfg(split_root, epochs=6, patience=2), run_dir=tmp_path / "r")
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 1


def test_norm_none_leaves_no_norm_layer_and_trains():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3, norm="none")
    assert count_norms(model) == 0
    x = torch.randn(16, 3, 32, 32)
    y = torch.arange(16) % 3
    x = x + y.view(-1, 1, 1, 1).float()  # learnable signal
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5


def test_accumulation_and_clip_run(split_root, tmp_path):
    result, _ = train(_cfg(split_root, epochs=1, accum_steps=2, grad_clip=1.0, optimizer="sgd", lr=0.05), run_dir=tmp_path / "r")
    assert result.epochs_run == 1


@pytest.mark.slow
def test_sigterm_through_the_cli_saves_and_resumes(tmp_path):
    from conftest import make_split_root

    data = make_split_root(tmp_path / "d", train=60, test=4)
    run = tmp_path / "run"
    import subprocess
    import sys
    import os

    proc = subprocess.Popen(
        [sys.executable, "-m", "imgcls", "train", str(data), "--out", str(run), "--model", "resnet18",
         "--img-size", "32", "--epochs", "40", "--batch-size", "8", "--precision", "fp32"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
    )
    deadline = time.time() + 240
    while not (run / "metrics.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "resumable checkpoint" in err and "Traceback" not in err
    _, meta = ckpt.load(run / "checkpoints" / "last.safetensors")
    done = meta["position"]["epoch"]
    assert done >= 1
    r = run_cli("train", "--resume", "--out", str(run), "--epochs", str(done + 1))
    assert r.returncode == 0, r.stderr
    assert (run / "summary.json").exists()


@pytest.mark.slow
def test_torchrun_two_cpu_ranks(tmp_path):
    """The same entry point under torchrun: DDP over gloo, each rank a share of the data, rank 0 writes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import make_split_root

    data = make_split_root(tmp_path / "d", train=20, test=4)
    run = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", "29531",
         "-m", "imgcls", "train", str(data), "--out", str(run), "--model", "resnet18", "--img-size", "32",
         "--epochs", "2", "--batch-size", "8", "--precision", "fp32"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "summary.json").exists() and (run / "eval" / "metrics.json").exists()
    assert len((run / "metrics.csv").read_text().splitlines()) == 3
