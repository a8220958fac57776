"""The training loop: exact resume after a real signal, the optimizer step, NaN guard, early stopping,
schedules, precision, TensorBoard, torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import imgcls.engine.train as train_mod
from imgcls.config import TrainConfig
from imgcls.engine import batches as batches_mod
from imgcls.engine import checkpoint as ckpt
from imgcls.engine import runtime as rt_mod
from imgcls.engine.runtime import Runtime
from imgcls.engine.state import TrainState
from imgcls.engine.step import OptimizerStep
from imgcls.engine.train import make_scheduler, train
from imgcls.errors import Interrupted
from imgcls.errors import ImgclsError
from imgcls.models import build_model, count_norms
from conftest import make_split_root, run_cli

CPU = torch.device("cpu")


def _cfg(data, **kw) -> TrainConfig:
    base = dict(
        data=str(data), model="resnet18", img_size=32, epochs=3, batch_size=8, precision="fp32",
        dropout=0.2, augment="flip-rotate", ema=0.9, lr=3e-3, tensorboard=False,
    )
    return TrainConfig(**(base | kw))


def _weights(run_dir, which="last"):
    tensors, _ = ckpt.load(run_dir / "checkpoints" / f"{which}.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema.", "rng."))}


def sigterm_after_step(monkeypatch, n: int) -> None:
    """Send this process a real SIGTERM right after optimizer step ``n`` (the loop's handler sets its flag;
    the loop notices at the step boundary)."""
    real = OptimizerStep.step

    def step(self):
        real(self)
        if self.state.global_step == n:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(OptimizerStep, "step", step)


def test_resume_after_sigterm_matches_uninterrupted_run_bit_for_bit(split_root, tmp_path, monkeypatch):
    cfg = _cfg(split_root, tensorboard=True)
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or what an earlier test's library left (Ray's)
    train(cfg, run_dir=tmp_path / "straight")
    sigterm_after_step(monkeypatch, 8)  # 6 steps per epoch here: inside epoch 2
    with pytest.raises(Interrupted, match="SIGTERM in epoch 2 at step 2"):
        train(cfg, run_dir=tmp_path / "resumed")
    monkeypatch.undo()
    _, meta = ckpt.load(tmp_path / "resumed" / "checkpoints" / "last.safetensors")
    assert meta["position"]["epoch"] == 1 and meta["position"]["step_in_epoch"] == 2
    assert signal.getsignal(signal.SIGTERM) is before  # the loop's handler is gone again
    train(cfg, run_dir=tmp_path / "resumed", resume=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = (tmp_path / "resumed" / "metrics.csv").read_text().splitlines()
    assert len(lines) == 4  # header + 3 epochs, none repeated
    assert [s.step for s in _scalars(tmp_path / "resumed", "accuracy/val")] == [1, 2, 3]


def _scalars(run_dir: Path, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return acc.Scalars(tag)


def test_tensorboard_events_hold_the_epoch_metrics(split_root, tmp_path):
    import csv

    run = tmp_path / "run"
    train(_cfg(split_root, epochs=2, tensorboard=True), run_dir=run)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    for key, tag in {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train",
                     "val_acc": "accuracy/val", "lr": "learning_rate", "img_per_s": "images_per_s"}.items():
        events = _scalars(run, tag)
        assert [e.step for e in events] == [1, 2], tag
        for e, row in zip(events, rows):
            assert e.value == pytest.approx(float(row[key]), rel=1e-4), tag
    train(_cfg(split_root, epochs=1), run_dir=tmp_path / "off")  # tensorboard=False
    assert not (tmp_path / "off" / "tensorboard").exists()


def test_different_seeds_differ_same_seed_repeats(split_root, tmp_path):
    train(_cfg(split_root, epochs=1), run_dir=tmp_path / "a")
    train(_cfg(split_root, epochs=1), run_dir=tmp_path / "b")
    train(_cfg(split_root, epochs=1, seed=1), run_dir=tmp_path / "c")
    a, b, c = (_weights(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if k.startswith("model."))


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


def test_early_stopping(split_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(batches_mod.Validator, "__call__", lambda self, module: (1.0, 0.5))  # never improves after epoch 1
    monkeypatch.setenv("IMGCLS_QUIET", "0")
    result, _ = train(_cfg(split_root, epochs=6, patience=2), run_dir=tmp_path / "r")
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 1
    assert "early stop: val accuracy has not improved for 2 epoch(s)" in capsys.readouterr().err  # the select score


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


# -- the optimizer step on a tiny model, no data set -------------------------------------------------------


def _tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def _toy_batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 3, 2, 2, generator=g) + y.view(-1, 1, 1, 1).float()
    return x, y


def _stepper(model, *, opt=None, precision="fp32", accum=1, clip=0.0, scaler=None, scheduler=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState(model=model, optimizer=opt, scheduler=scheduler, scaler=scaler or torch.amp.GradScaler("cpu", enabled=False),
                       ema=None, aug_gen=torch.Generator())
    return OptimizerStep(state, criterion=nn.CrossEntropyLoss(), precision=precision, device=CPU, accum_steps=accum, grad_clip=clip)


def test_accumulating_k_batches_equals_one_batch_k_times_larger():
    x, y = _toy_batch(16)
    big = _stepper(_tiny())
    big.forward_backward(big.state.model, x, y)
    big.step()
    acc = _stepper(_tiny(), accum=4)
    for part in range(4):
        acc.forward_backward(acc.state.model, x[part * 4 : part * 4 + 4], y[part * 4 : part * 4 + 4])
    acc.step()
    assert big.state.global_step == acc.state.global_step == 1
    changed = [not torch.equal(p, q) for p, q in zip(big.state.model.parameters(), _tiny().parameters())]
    assert all(changed)
    for p, q in zip(big.state.model.parameters(), acc.state.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # and not by accident: without the division by k the step is k times larger
    wrong = _stepper(_tiny(), accum=1)
    for part in range(4):
        wrong.forward_backward(wrong.state.model, x[part * 4 : part * 4 + 4], y[part * 4 : part * 4 + 4])
    wrong.step()
    assert not torch.allclose(wrong.state.model[1].weight, big.state.model[1].weight, rtol=1e-3, atol=1e-4)


class RecordingSGD(torch.optim.SGD):
    """SGD that records the total gradient norm it steps with."""

    norms: list[float] = []

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return super().step(closure)


@pytest.mark.parametrize("fp16_scaler", [False, True])
def test_clipping_bounds_the_gradient_norm(fp16_scaler):
    x, y = _toy_batch(16)
    x = x * 50  # large inputs, large gradients
    model = _tiny()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    unclipped = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
    model.zero_grad()
    assert unclipped > 2.0
    RecordingSGD.norms = []
    scaler = torch.amp.GradScaler("cpu", enabled=fp16_scaler, init_scale=1024.0)
    s = _stepper(model, opt=RecordingSGD(model.parameters(), lr=0.01), clip=0.5, scaler=scaler)
    s.forward_backward(model, x, y)
    s.step()
    assert RecordingSGD.norms and RecordingSGD.norms[0] == pytest.approx(0.5, rel=1e-3)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_step_runs_and_lowers_the_loss(precision):
    """bf16 autocast, and fp16 autocast with the GradScaler stepping (CPU autocast supports both)."""
    x, y = _toy_batch(32)
    model = _tiny()
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    s = _stepper(model, opt=torch.optim.Adam(model.parameters(), lr=1e-2), precision=precision, scaler=scaler)
    losses = []
    for _ in range(30):
        loss, correct = s.forward_backward(model, x, y)
        s.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]
    assert int(correct) > 24
    if precision == "fp16":
        assert scaler.get_scale() > 0 and scaler.state_dict()["_growth_tracker"] > 0  # the scaler stepped


def test_constant_schedule_warms_up_then_holds_the_rate():
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    cfg = TrainConfig(data="x", schedule="constant", warmup_epochs=1.0, lr=0.2, epochs=3)
    assert make_scheduler(cfg.replace(warmup_epochs=0.0), opt, steps_per_epoch=4) is None  # nothing to schedule
    s = _stepper(model, opt=opt, scheduler=make_scheduler(cfg, opt, steps_per_epoch=4))
    x, y = _toy_batch(8)
    lrs = []
    for _ in range(12):
        s.forward_backward(model, x, y)
        s.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] < lrs[1] < lrs[2] < 0.2  # warm-up over the first epoch (4 steps)
    assert lrs[3:] == pytest.approx([0.2] * 9)
    cosine = make_scheduler(cfg.replace(schedule="cosine", warmup_epochs=0.0), torch.optim.SGD(model.parameters(), lr=0.2), 4)
    cosine.step_update(num_updates=11)
    assert cosine.optimizer.param_groups[0]["lr"] < 0.01  # cosine decays to 1 % of lr by the end


# -- per-rank random state, device changes ----------------------------------------------------------------


def _state(device_gen_seed=0) -> TrainState:
    model = _tiny()
    return TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scheduler=None,
                      scaler=torch.amp.GradScaler("cpu", enabled=False), ema=None,
                      aug_gen=torch.Generator().manual_seed(device_gen_seed))


def _two_rank_checkpoint():
    """What rank 0 writes under torchrun with two ranks (each rank's generators differ)."""
    tensors, meta = _state(1).dump(Runtime(device=CPU))
    other, other_meta = _state(2).dump(Runtime(device=CPU))
    tensors |= {k.replace("rng.0.", "rng.1."): v for k, v in other.items() if k.startswith("rng.0.")}
    meta["rng"]["ranks"].append(other_meta["rng"]["ranks"][0])
    return tensors, meta


def test_each_rank_restores_its_own_augmentation_stream():
    tensors, meta = _two_rank_checkpoint()
    for rank, seed in ((0, 1), (1, 2)):
        s = _state(99)
        assert s.restore(tensors, meta, Runtime(device=CPU, rank=rank, world=2), reseed=0) is None
        assert torch.equal(s.aug_gen.get_state(), torch.Generator().manual_seed(seed).get_state())
    with pytest.raises(ImgclsError, match="saved by 2 process"):
        _state().restore(tensors, meta, Runtime(device=CPU), reseed=0)


def test_resume_on_another_device_type_restarts_the_augmentation_stream_with_a_note():
    tensors, meta = _state(1).dump(Runtime(device=CPU))
    meta["rng"]["device"] = "cuda"  # as a GPU run writes it: a 16-byte Philox state
    tensors["rng.0.aug"] = torch.zeros(16, dtype=torch.uint8)
    meta["position"]["global_step"] = 5
    s = _state(99)
    note = s.restore(tensors, meta, Runtime(device=CPU), reseed=7)
    assert note and "saved on cuda and continues on cpu" in note
    assert torch.equal(s.aug_gen.get_state(), torch.Generator().manual_seed(7 + 5).get_state())


def test_training_uses_fused_optimizer_kernels_and_a_resume_keeps_them():
    """imgcls asks torch for its fused kernels (a loop over tensors is torch's CPU default); a checkpoint
    written with the default kernels (before this change) resumes into fused ones and continues the same
    numbers as the default kernels would."""
    from imgcls.engine.train import fused_kernels

    assert fused_kernels(torch.device("cpu")) == {"fused": True} and fused_kernels(torch.device("meta")) == {}

    def adam_state(fused: bool) -> TrainState:
        torch.manual_seed(0)
        model = _tiny()
        opt = torch.optim.Adam(model.parameters(), lr=0.01, **({"fused": True} if fused else {}))
        return TrainState(model=model, optimizer=opt, scheduler=None, scaler=torch.amp.GradScaler("cpu", enabled=False),
                          ema=None, aug_gen=torch.Generator().manual_seed(0))

    def steps(state: TrainState, n: int) -> None:
        g = torch.Generator().manual_seed(state.global_step)
        for _ in range(n):
            x = torch.randn(4, 3, 2, 2, generator=g)
            state.model(x).square().mean().backward()
            state.optimizer.step()
            state.optimizer.zero_grad()
            state.global_step += 1

    old = adam_state(fused=False)
    steps(old, 3)
    tensors, meta = old.dump(Runtime(device=CPU))
    tensors = {k: v.clone() for k, v in tensors.items()}  # as read from a file: not the live optimizer state
    resumed = adam_state(fused=True)
    resumed.restore(tensors, meta, Runtime(device=CPU), reseed=0)
    assert all(g["fused"] for g in resumed.optimizer.param_groups)
    steps(old, 2)
    steps(resumed, 2)
    for a, b in zip(old.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_gives_the_optimizer_state_the_parameters_channels_last_layout():
    """A checkpoint returns exp_avg & co. contiguous; a channels_last conv weight is not. torch's fused CPU
    kernel would then silently compute a wrong update; restore gives the state its parameter's layout."""

    def conv_state() -> TrainState:
        torch.manual_seed(0)
        model = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
        return TrainState(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.01, fused=True), scheduler=None,
                          scaler=torch.amp.GradScaler("cpu", enabled=False), ema=None, aug_gen=torch.Generator().manual_seed(0))

    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)

    def steps(state: TrainState, n: int) -> None:
        for _ in range(n):
            state.model(x).square().mean().backward()
            state.optimizer.step()
            state.optimizer.zero_grad()

    straight = conv_state()
    steps(straight, 2)
    tensors, meta = straight.dump(Runtime(device=CPU))
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}  # as a safetensors file gives them back
    resumed = conv_state()
    resumed.restore(tensors, meta, Runtime(device=CPU), reseed=0)
    assert resumed.optimizer.state[resumed.model.weight]["exp_avg"].stride() == resumed.model.weight.stride()
    steps(straight, 2)
    steps(resumed, 2)
    assert torch.equal(straight.model.weight, resumed.model.weight)


def test_background_checkpoint_writes_land_and_report_their_errors(tmp_path):
    """The GPU mode of Checkpoints (a writer thread), driven on the CPU: the file that lands is the state at
    the time of the call (copied before training goes on); a failed write is raised on the
    next save, not lost."""
    from imgcls.engine.state import Checkpoints

    state = _state(1)
    ckpts = Checkpoints(tmp_path / "run", {"classes": ["a", "b", "c"]}, Runtime(device=CPU))
    ckpts.background = True
    saved = {k: v.clone() for k, v in state.model.state_dict().items()}
    ckpts.save(state, best_val_acc=0.5)
    with torch.no_grad():
        for p in state.model.parameters():
            p.add_(1.0)  # the next steps, while the writer runs
    ckpts.wait()
    tensors, meta = ckpt.load(ckpts.last)
    assert meta["kind"] == "full" and all(torch.equal(tensors[f"model.{k}"], v) for k, v in saved.items())
    assert ckpt.load(ckpts.best)[1]["val_acc"] == 0.5
    ckpts.last.unlink()
    ckpts.last.mkdir()  # a folder where the file should go: the write fails
    ckpts.save(state)
    with pytest.raises(OSError):
        ckpts.wait()


def test_cuda_index_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ImgclsError, match="cuda:0 under torchrun would put all 2 processes on one GPU"):
        rt_mod.setup("cuda:0")


def test_the_training_set_goes_to_the_gpu_only_when_it_fits():
    gib = 2**30
    assert batches_mod.fits_on_device(10 * gib, free_bytes=139 * gib)  # intel-scenes-size on an H200
    assert not batches_mod.fits_on_device(180 * gib, free_bytes=139 * gib)  # ImageNet-1k at 224 px
    assert not batches_mod.fits_on_device(60 * gib, free_bytes=100 * gib)  # half is left for the model


# -- the real CLI, recipes, processes ---------------------------------------------------------------------


@pytest.mark.slow
def test_resume_accepts_the_same_command_and_refuses_a_real_change(tmp_path):
    data = make_split_root(tmp_path / "d", train=8, test=3)
    run = tmp_path / "run"
    common = [str(data), "--model", "resnet18", "--img-size", "32", "--batch-size", "8", "--out", str(run), "--no-tensorboard"]
    r = run_cli("train", *common, "--epochs", "3")
    assert r.returncode == 0, r.stderr
    r = run_cli("train", *common, "--epochs", "4", "--resume")
    assert r.returncode == 0, r.stderr
    assert len((run / "metrics.csv").read_text().splitlines()) == 5  # header + epochs 1-4
    _, meta = ckpt.load(run / "checkpoints" / "last.safetensors")
    assert meta["position"]["epoch"] == 4
    r = run_cli("train", *common[:-1], "--epochs", "5", "--resume", "--model", "resnet34")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "imgcls: error: --resume cannot change model: the run has 'resnet18', the command gives 'resnet34' "
        "(only epochs, patience, device, tensorboard may change)"
    ]


@pytest.mark.slow
def test_fast_finetune_recipe_end_to_end(tmp_path):
    data = make_split_root(tmp_path / "d", train=10, test=3)
    run = tmp_path / "run"
    # 27 training images in batches of 8: 3 steps an epoch, 9 in all, far shorter than EMA 0.99's horizon of
    # ~100 steps; the EMA's warmup must make the saved weights the mean of the iterates, not the first one
    r = run_cli("train", str(data), "--recipe", "fast-finetune", "--img-size", "32", "--epochs", "3", "--batch-size", "8",
                "--out", str(run), env={"IMGCLS_QUIET": "0"})
    assert r.returncode == 0, r.stderr
    assert "frozen-stage features" in r.stderr or "efficientnet_lite0" in r.stderr
    import json

    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "efficientnet_lite0" and summary["epochs_run"] == 3
    assert summary["test_accuracy"] > 1 / 3  # pretrained features separate these colours within a few steps
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["freeze"] == 4 and cfg["ema"] == 0.99 and cfg["tta"] is True
    assert json.loads((run / "eval" / "metrics.json").read_text())["tta"] is True


@pytest.mark.slow
def test_sigterm_through_the_cli_saves_and_resumes(tmp_path):
    data = make_split_root(tmp_path / "d", train=60, test=4)
    run = tmp_path / "run"
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
    """The same entry point under torchrun: DDP over gloo, each rank a share of the data, rank 0 writes,
    and every rank's augmentation stream is in the checkpoint."""
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
    tensors, meta = ckpt.load(run / "checkpoints" / "last.safetensors")
    assert len(meta["rng"]["ranks"]) == 2
    assert not torch.equal(tensors["rng.0.aug"], tensors["rng.1.aug"])


RANK_WAIT = """
import os, sys, time
from datetime import timedelta
import torch.distributed as dist
from imgcls.engine import runtime as rt_mod
dist.init_process_group("gloo", timeout=timedelta(seconds=10))  # stands in for NCCL's 10 minutes
rt = rt_mod.setup("cpu")
rt_mod.barrier(rt)
if rt.rank == 0:
    time.sleep(16)  # a long first decode: 6 s past the timeout
try:
    rt_mod.barrier(rt, slow=sys.argv[1] == "slow")
    print("waited", flush=True)
except RuntimeError:
    print("timed out", flush=True)
os._exit(0)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind,outcome", [("slow", "waited"), ("plain", "timed out")])
def test_ranks_wait_for_a_decode_longer_than_the_collective_timeout(kind, outcome):
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29540 + (kind == "slow")), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_WAIT, kind], env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert outs[1][0].strip() == outcome, outs[1]


def test_sgd_without_momentum_trains(tmp_path):
    # timm's "sgd" is Nesterov SGD, which torch rejects with momentum 0; that must not be a traceback
    data = make_split_root(tmp_path / "d", train=4, test=1)
    r = run_cli("train", str(data), "--model", "resnet18", "--img-size", "32", "--epochs", "1", "--batch-size", "8",
                "--optimizer", "sgd", "--momentum", "0", "--lr", "0.01", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr


def test_a_study_can_give_a_running_run_more_cpu_threads(split_root, tmp_path, monkeypatch, capsys):
    """study --jobs writes a larger share to the run's threads file when another run ends; the loop takes it up."""
    threads_file = tmp_path / "threads"
    threads_file.write_text("2\n")
    monkeypatch.setenv(rt_mod.THREADS_FILE_ENV, str(threads_file))
    monkeypatch.setenv("IMGCLS_QUIET", "0")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(_cfg(split_root, epochs=1), run_dir=tmp_path / "r")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert "now on 2 CPU thread(s): another run of the study ended" in capsys.readouterr().err


def test_core_share_reads_the_file_at_most_every_few_seconds_and_ignores_a_bad_one(tmp_path, monkeypatch):
    f = tmp_path / "threads"
    share = rt_mod.CoreShare(str(f), every_s=0.0)
    calls = []
    monkeypatch.setattr(rt_mod.torch, "set_num_threads", calls.append)
    monkeypatch.setattr(rt_mod.torch, "get_num_threads", lambda: 1)
    assert share.poll() is None  # no file yet
    f.write_text("half\n")
    assert share.poll() is None and calls == []  # not a number: nothing changes
    f.write_text("1\n")
    assert share.poll() is None and calls == []  # already so
    f.write_text("3\n")
    assert share.poll() == 3 and calls == [3]
    slow = rt_mod.CoreShare(str(f), every_s=3600.0)
    assert slow.poll() == 3 and slow.poll() is None  # the second look waits its turn
    assert rt_mod.CoreShare.from_env(torch.device("cuda")).path is None  # threads are a CPU run's business


def test_progressive_resizing_trains_the_first_epochs_smaller(split_root, tmp_path, monkeypatch):
    sizes = []
    real = OptimizerStep.forward_backward

    def spy(self, net, x, y, *, sync=True):
        sizes.append((self.state.epoch, x.shape[-1], x.is_contiguous(memory_format=torch.channels_last)))
        return real(self, net, x, y, sync=sync)

    monkeypatch.setattr(OptimizerStep, "forward_backward", spy)
    result, _ = train(_cfg(split_root, epochs=3, low_res=16, low_res_epochs=2, ema=0.0), run_dir=tmp_path / "r")
    assert {(e, s) for e, s, _ in sizes} == {(0, 16), (1, 16), (2, 32)} and all(cl for _, _, cl in sizes)
    assert result.epochs_run == 3
    assert len(_weights(tmp_path / "r")) > 0  # checkpoints and evaluation at the full size as usual


def test_the_smaller_batch_is_torchvisions_antialiased_resize():
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(4, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    out = batches_mod.shrink(x, 64)
    assert out.shape == (4, 3, 64, 64) and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, TF.resize(x.contiguous(), [64, 64], antialias=True), atol=1e-5, rtol=0)
