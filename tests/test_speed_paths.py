"""Speed paths that must not change results: batch-norm folding for inference, the malloc setting."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

from imgcls.engine import features as feat_mod
from imgcls.engine.evaluate import inference_model, predict_logits
from imgcls.engine.runtime import choose_precision
from imgcls.models import build_model, freeze_stages
from imgcls.models.fold import fold_batchnorm_, folded_copy


def _randomise_norms(model: nn.Module) -> None:
    """Non-trivial running statistics and affine terms, so a wrong fold shows."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0", "mobilenetv3_small_050"])
def test_folded_copy_matches_and_leaves_the_model_alone(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=4)
    _randomise_norms(model)
    freeze_stages(model, 2)  # a mix of train- and eval-mode submodules, as during a fine-tune
    modes = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 40, 40)
    fast = folded_copy(model, x[:2])
    assert fast is not None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules()), "every conv/norm pair folds in these models"
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    model.train()
    freeze_stages(model, 2)
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class NormFirst(nn.Module):
    """Registers conv then norm, but normalises the input before the conv: folding would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.conv(self.bn(x)).mean((2, 3))


def test_a_fold_that_changes_the_output_is_refused():
    model = NormFirst()
    _randomise_norms(model)
    assert fold_batchnorm_(NormFirst()) == 1  # the registration-order guess does match here...
    assert folded_copy(model, torch.randn(2, 3, 8, 8)) is None  # ...and the check catches that it is wrong


def test_nothing_to_fold_gives_none():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())
    assert folded_copy(model, torch.randn(1, 3, 8, 8)) is None


def test_predict_logits_folded_equals_the_plain_forward():
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", num_classes=5)
    _randomise_norms(model)
    images = torch.randint(0, 256, (37, 32, 32, 3), dtype=torch.uint8)  # not a multiple of the batch size
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    got = predict_logits(model, images, mean=mean, std=std, device=torch.device("cpu"), tta=True)
    model.eval()
    with torch.no_grad():
        x = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        want = ((model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2).log()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_frozen_stages_of_the_folded_copy_give_the_frozen_stages_output():
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", num_classes=3)
    _randomise_norms(model)
    freeze_stages(model, 4)
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    fast = inference_model(model, images, mean=(0.5,) * 3, std=(0.25,) * 3, device=torch.device("cpu"))
    assert fast is not model
    x = (images.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    model.eval()
    with torch.no_grad():
        got = feat_mod.split_forward(fast, 4)[0](x)
        torch.testing.assert_close(got, feat_mod.split_forward(model, 4)[0](x), rtol=1e-4, atol=1e-4)


FREED_MEMORY_PROBE = """
import os
from imgcls.engine.runtime import keep_freed_memory
kept = keep_freed_memory(), keep_freed_memory()
import torch

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

before = rss()
x = torch.ones(8 * 2**20)  # 32 MiB, every page touched: far above malloc's default mmap threshold
del x
print(*kept, (rss() - before) >> 20)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting, read from /proc")
def test_freed_memory_stays_in_the_process_unless_declined():
    """A child process each (malloc settings are per process): with the setting, a freed 32 MiB block stays
    mapped (no page faults to map it again next step); with IMGCLS_MALLOC=default it goes back to the OS."""
    kept = subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE], capture_output=True, text=True, check=True).stdout.split()
    assert kept[:2] == ["True", "True"] and int(kept[2]) >= 24, kept
    env = os.environ | {"IMGCLS_MALLOC": "default"}
    declined = subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE], capture_output=True, text=True, check=True, env=env).stdout.split()
    assert declined[:2] == ["False", "False"] and int(declined[2]) <= 8, declined


def test_an_already_folded_model_is_not_copied_again():
    model = build_model("resnet18", num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    fast = folded_copy(model, x)
    assert fast is not None and folded_copy(fast, x) is None


class FlagRecorder(nn.Module):
    """Notes the TF32 settings in force each time it runs (inside the model, so during the fold's probe)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return x


def test_the_fold_probe_runs_without_tf32_and_restores_the_settings():
    # With TF32 (on for GPU training, cuDNN's default for convolutions) the probe's two forwards differ by
    # ~1e-3 relative per layer and a sound fold would be refused. A CPU computes in fp32 either way, so
    # what is checked here is that the probe runs with TF32 off and leaves the run's settings as they were.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), FlagRecorder(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    _randomise_norms(model)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    try:
        cudnn.allow_tf32 = matmul.allow_tf32 = True
        fast = folded_copy(model, torch.randn(2, 3, 8, 8))
        assert fast is not None
        assert model[2].seen == [(False, False)] and fast[2].seen == [(False, False)]
        assert (cudnn.allow_tf32, matmul.allow_tf32) == (True, True)
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before


def test_precision_auto_on_cuda_follows_native_bf16():
    # bf16 is native from compute capability 8.0 (A100, H100, H200); V100 (7.0) and T4 (7.5) emulate it,
    # and torch.cuda.is_bf16_supported() says yes there too: they get fp16 (with a GradScaler in training).
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    cuda = torch.device("cuda")
    for capability, want in [((6, 1), "fp16"), ((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((8, 9), "bf16"), ((9, 0), "bf16")]:
        assert choose_precision("auto", model, cuda, 150, capability=capability) == want, capability
    assert choose_precision("bf16", model, cuda, 150, capability=(7, 0)) == "bf16"  # asked for, given


def test_predict_logits_copies_to_the_host_once():
    # a .cpu() per batch is a device sync per batch on a GPU
    from torch.overrides import TorchFunctionMode

    class CountCopies(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "cpu":
                CountCopies.n += 1
            return func(*args, **(kwargs or {}))

    model = build_model("resnet18", num_classes=3)
    images = torch.randint(0, 256, (37, 32, 32, 3), dtype=torch.uint8)
    with CountCopies():
        logits = predict_logits(model, images, mean=(0.5,) * 3, std=(0.25,) * 3, device=torch.device("cpu"), batch_size=8)
    assert logits.shape == (37, 3) and CountCopies.n == 1
