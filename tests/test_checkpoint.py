"""Checkpoints are atomic, tamper-evident and never unpickled."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from imgcls.engine import checkpoint as ckpt
from imgcls.errors import ImgclsError
from imgcls.models import load_state_file


def test_round_trip_with_nested_state(tmp_path):
    opt_state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}]}
    tensors, skel = ckpt.split_state("optim", opt_state)
    ckpt.save(tmp_path / "c.safetensors", {"model.w": torch.arange(4.0), **tensors}, {"optimizer": skel, "epoch": 2})
    t, meta = ckpt.load(tmp_path / "c.safetensors")
    back = ckpt.join_state(meta["optimizer"], {k: v for k, v in t.items() if k.startswith("optim.")})
    assert back["param_groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(back["state"][0]["exp_avg"], torch.ones(2)) and meta["epoch"] == 2


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    ckpt.save(path, {"w": torch.zeros(3)}, {"epoch": 1})

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        ckpt.save(path, {"w": torch.ones(3)}, {"epoch": 2})
    monkeypatch.undo()
    t, meta = ckpt.load(path)
    assert meta["epoch"] == 1 and torch.equal(t["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]  # no temp file left behind


def test_tampered_checkpoint_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    ckpt.save(path, {"w": torch.zeros(64)}, {"epoch": 1})
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(ImgclsError, match="integrity"):
        ckpt.load(path)
    path.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ImgclsError, match="damaged"):
        ckpt.load(path)
    with pytest.raises(ImgclsError, match="not found"):
        ckpt.load(tmp_path / "missing.safetensors")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "x": _Evil()}, evil)
    with pytest.raises(ImgclsError, match="refused"):
        load_state_file(evil)
    with pytest.raises(ImgclsError, match="refused|not a"):
        ckpt.load(evil)
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(ImgclsError):
        ckpt.load(raw)
    assert not (tmp_path / "PWNED").exists()
