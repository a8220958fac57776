"""Batched augmentation matches the per-image torchvision presets in distribution."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torchvision.transforms import v2

from imgcls.data.augment import PRESETS, BatchAugment, to_float

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _image(size=32) -> torch.Tensor:
    """An asymmetric uint8 picture (H x W x 3): a diagonal ramp plus a bright block off-centre."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    img = torch.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], dim=-1)
    img[4:12, 18:28] = 255
    return img.to(torch.uint8)


def _ours(preset: str, n: int) -> torch.Tensor:
    batch = _image()[None].repeat(n, 1, 1, 1)
    out = BatchAugment(preset, mean=MEAN, std=STD, device="cpu")(batch, torch.Generator().manual_seed(0))
    return out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)  # back to [0, 1]


def _reference(transform, n: int) -> torch.Tensor:
    torch.manual_seed(0)
    chw = _image().permute(2, 0, 1)
    return torch.stack([transform(chw) for _ in range(n)]).float() / 255


@pytest.mark.parametrize(
    "preset, reference, tol",
    [
        ("flip", v2.RandomHorizontalFlip(), 0.03),
        ("flip-rotate", v2.Compose([v2.RandomHorizontalFlip(), v2.RandomRotation(15)]), 0.04),
        ("rrc", v2.Compose([v2.RandomResizedCrop(32, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip()]), 0.06),
    ],
)
def test_statistics_match_per_image_presets(preset, reference, tol):
    n = 1500
    ours, ref = _ours(preset, n), _reference(reference, n)
    assert ours.shape == ref.shape
    assert (ours.mean(0) - ref.mean(0)).abs().mean() < tol  # the average picture
    assert (ours.std(0) - ref.std(0)).abs().mean() < tol * 1.5  # how much pixels vary across draws
    # per-image parameters: the batch is not one repeated draw
    assert ours.std(0).mean() > 0.02


def test_layout_dtype_and_determinism():
    batch = _image()[None].repeat(8, 1, 1, 1)
    aug = BatchAugment("strong", mean=MEAN, std=STD, device="cpu")
    a = aug(batch, torch.Generator().manual_seed(3))
    b = aug(batch, torch.Generator().manual_seed(3))
    assert a.dtype == torch.float32 and a.shape == (8, 3, 32, 32)
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)
    none = BatchAugment("none", mean=MEAN, std=STD, device="cpu")(batch, torch.Generator())
    assert torch.allclose(none, to_float(batch, torch.tensor(MEAN), torch.tensor(STD)))


# -- the GPU rules, checked on the CPU: what a CUDA run needs from every step -------------------------

DRAWS = {
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "bernoulli", "multinomial",
    "normal", "poisson", "uniform_", "normal_", "random_", "bernoulli_", "exponential_", "geometric_", "cauchy_",
    "log_normal_",
}
# what on a GPU is a host-to-device copy (constants moved per step) or a device-to-host read (a sync)
COPIES = {"to", "cuda", "cpu", "tensor", "as_tensor", "from_numpy"}
READS = {"item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__", "nonzero"}


class Recorder(TorchFunctionMode):
    """Records, for every torch call made inside it, the function's name and for random draws the generator
    and the device the draw is made on (named by ``device=``, or the tensor drawn into)."""

    def __init__(self):
        super().__init__()
        self.draws: list[tuple[str, torch.Generator | None, torch.device | None, tuple]] = []
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        self.names.append(name)
        out = func(*args, **kwargs)
        if name in DRAWS:
            if name.endswith("_") or name.endswith("_like"):
                where = args[0].device
            else:
                where = torch.device(kwargs["device"]) if kwargs.get("device") is not None else None
            self.draws.append((name, kwargs.get("generator"), where, tuple(out.shape)))
        return out


@pytest.mark.parametrize("preset", PRESETS)
def test_every_draw_uses_the_generator_on_the_batchs_device(preset):
    # A draw without device= is made on the CPU whatever its generator: with the run's CUDA generator that
    # is "Expected a 'cpu' device type for generator". So every draw from the run's generator names its device.
    batch = _image()[None].repeat(16, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    aug = BatchAugment(preset, mean=MEAN, std=STD, device="cpu")
    with Recorder() as rec:
        aug(batch, g)
    ours = [d for d in rec.draws if d[1] is g]
    assert ours or preset == "none"
    for name, _, where, _ in ours:
        assert where == g.device == batch.device, f"{name} draws from the run's generator on {where}"
    others = [d for d in rec.draws if d[1] is not g]
    if preset == "randaugment":
        # torchvision's op choices: scalars from the process's CPU generator (forked and seeded, see below)
        assert others and all(where is None and shape == () for _, _, where, shape in others)
    else:
        assert not others, f"draws outside the run's generator: {others}"


@pytest.mark.parametrize("preset", PRESETS)
def test_augmentation_leaves_the_process_rngs_alone(preset):
    # Dropout and drop-path draw from the process's default generators; augmentation must not reseed or
    # advance them. torch.manual_seed would also reseed every CUDA generator: on a machine without CUDA
    # torch queues that call, which is what the tracker below holds.
    from torch.cuda import _lazy_seed_tracker

    batch = _image()[None].repeat(16, 1, 1, 1)
    torch.manual_seed(5)
    cpu_before, cuda_before = torch.get_rng_state(), _lazy_seed_tracker.get_calls()
    out = BatchAugment(preset, mean=MEAN, std=STD, device="cpu")(batch, torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 32, 32) and torch.isfinite(out).all()
    assert torch.equal(torch.get_rng_state(), cpu_before)
    assert _lazy_seed_tracker.get_calls() == cuda_before


def test_randaugment_replays_from_the_generator_state_and_varies_with_it():
    batch = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    aug = BatchAugment("randaugment", mean=MEAN, std=STD, device="cpu")
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    first, second = aug(batch, g), aug(batch, g)
    g.set_state(state)  # as a resume restores it
    assert torch.equal(aug(batch, g), first) and torch.equal(aug(batch, g), second)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "randaugment"])
def test_the_step_moves_no_constants_and_reads_nothing_back(preset):
    # On a GPU each .to(device) of a constant is a host-to-device copy, and each .item()/int()/bool() of a
    # device value a sync. (RandAugment is left out: torchvision's ops build their small parameter tensors per call.)
    batch = _image()[None].repeat(16, 1, 1, 1)
    aug = BatchAugment(preset, mean=MEAN, std=STD, device="cpu")
    constants = {k: (v, v.data_ptr(), v.clone()) for k, v in vars(aug).items() if isinstance(v, torch.Tensor)}
    assert {"mean", "std", "scale", "shift"} <= constants.keys()
    with Recorder() as rec:
        aug(batch, torch.Generator().manual_seed(0))
        aug(batch, torch.Generator().manual_seed(1))
    assert not COPIES & set(rec.names), f"copies in the step: {COPIES & set(rec.names)}"
    assert not READS & set(rec.names), f"host reads in the step: {READS & set(rec.names)}"
    for k, (t, ptr, value) in constants.items():
        now = getattr(aug, k)
        assert now is t and now.data_ptr() == ptr and torch.equal(now, value) and now.device == aug.device


def test_constants_live_on_the_construction_device_and_a_mismatch_is_a_clear_error():
    aug = BatchAugment("flip", mean=MEAN, std=STD, device="meta")
    assert aug.device.type == "meta" and all(t.device.type == "meta" for t in (aug.mean, aug.std, aug.scale, aug.shift))
    with pytest.raises(ValueError, match="constants on meta; the batch is on cpu"):
        aug(_image()[None], torch.Generator())
    with pytest.raises(ValueError, match="the generator on cpu"):
        BatchAugment("flip", mean=MEAN, std=STD, device="cpu")(_image()[None].to("meta"), torch.Generator())
