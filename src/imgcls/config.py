"""The typed run configuration: one frozen dataclass, built once by the CLI (or a study) and written
into every run folder and checkpoint.

Keys are the train options with underscores (``--img-size`` is ``img_size``). Precedence, lowest first:
field defaults < ``--recipe`` < ``--config FILE`` < explicit flags < ``--set key=value``.
Unknown keys and wrong types are errors; nothing from a file is ever evaluated as code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from imgcls.errors import ImgclsError
from imgcls.io import write_json

AUGMENTS = ("none", "flip", "flip-rotate", "rrc", "randaugment", "strong")
OPTIMIZERS = ("adam", "adamw", "sgd")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
NORMS = ("default", "none")
SCHEDULES = ("cosine", "constant")
RECIPES = ("none", "fast-finetune")
RESIZES = ("squash", "crop", "pad")
BALANCES = ("none", "sampler", "weights")
SELECTS = ("accuracy", "macro_f1", "balanced_accuracy")
IMG_SIZE_MIN, IMG_SIZE_MAX = 8, 1024
YAML_MAX_NODES = 100_000  # nodes after alias expansion: far above any real config or study spec


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training run computes."""

    data: str = ""
    # data
    img_size: int = 0  # 0 = derived from the data: its most common longer side, at most max_img_size
    max_img_size: int = 224  # ceiling of the derived size (a recipe may set a smaller one)
    val_fraction: float = 0.1  # carved from train when the data has no val split
    test_fraction: float = 0.1  # carved only from a plain folder of classes
    split_seed: int = 0  # fixed across training seeds, so every seed sees the same splits
    exclude_classes: tuple[str, ...] = ()
    max_bad_fraction: float = 0.05
    resize: str = "squash"  # squash | crop (centre square) | pad (to a square, ImageNet-mean grey)
    # model
    model: str = "resnet18"
    pretrained: bool = False
    weights: str = ""  # a local weights file (safetensors, or a tensors-only .pth)
    dropout: float = 0.0
    drop_path: float = 0.0
    norm: str = "default"
    freeze: int = 0  # number of leading feature stages kept frozen (fine-tuning)
    # optimisation
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    grad_clip: float = 0.0
    accum_steps: int = 1
    ema: float = 0.0  # EMA decay; 0 = off
    # loop
    epochs: int = 10
    low_res: int = 0  # progressive resizing: the first low_res_epochs epochs train at this size (0 = off)
    low_res_epochs: int = 0
    batch_size: int = 64
    augment: str = "flip-rotate"
    seed: int = 0
    patience: int = 0  # early stopping on val accuracy; 0 = off
    balance: str = "none"  # none | sampler (class-balanced epoch order) | weights (effective-number loss weights)
    select: str = "accuracy"  # the val score that picks the best checkpoint: accuracy | macro_f1 | balanced_accuracy
    tta: bool = False  # flip test-time augmentation in evaluation
    tensorboard: bool = True  # event files under RUN/tensorboard
    keep: float = 0.95  # share of validation images the "unknown" threshold keeps (deploy/calibration.py)
    # speed
    recipe: str = "none"
    precision: str = "auto"
    channels_last: str = "auto"  # auto | on | off
    device: str = "auto"
    weights_partial: bool = False  # accept --weights that cover under 90 % of the model's parameters

    def __post_init__(self) -> None:
        _check_choice("augment", self.augment, AUGMENTS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("recipe", self.recipe, RECIPES)
        _check_choice("channels_last", self.channels_last, ("auto", "on", "off"))
        _check_choice("resize", self.resize, RESIZES)
        _check_choice("balance", self.balance, BALANCES)
        _check_choice("select", self.select, SELECTS)
        # ranges are checked here, before any file is written; the bounds are what the code can honour
        # (seeds feed 64-bit generators after scaling; NumPy takes seeds below 2**32)
        for name, hi in (("epochs", 100_000), ("batch_size", 65_536), ("accum_steps", 1024)):
            if not 1 <= getattr(self, name) <= hi:
                raise ImgclsError(f"config: {name} must be at least 1 and at most {hi:,}, got {getattr(self, name)}")
        for name, hi in (("seed", 2**31 - 1), ("split_seed", 2**31 - 1), ("patience", 100_000), ("freeze", 64)):
            if not 0 <= getattr(self, name) <= hi:
                raise ImgclsError(f"config: {name} must be at least 0 and at most {hi:,}, got {getattr(self, name)}")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ImgclsError(f"config: {f.name} must be a finite number, got {v}")
        for name in ("weight_decay", "warmup_epochs", "grad_clip"):
            if getattr(self, name) < 0:
                raise ImgclsError(f"config: {name} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ImgclsError(f"config: momentum must be in [0, 1), got {self.momentum}")
        for name in ("val_fraction", "test_fraction", "max_bad_fraction", "dropout", "drop_path", "label_smoothing"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ImgclsError(f"config: {name} must be in [0, 1), got {v}")
        if not 0.0 < self.keep <= 1.0:
            raise ImgclsError(f"config: keep must be in (0, 1], got {self.keep}")
        if self.lr <= 0:
            raise ImgclsError(f"config: lr must be positive, got {self.lr}")
        if not 0.0 <= self.ema < 1.0:
            raise ImgclsError(f"config: ema is a decay in [0, 1), got {self.ema}")
        if self.img_size != 0 and not IMG_SIZE_MIN <= self.img_size <= IMG_SIZE_MAX:
            raise ImgclsError(f"config: img_size must be 0 (auto) or in [{IMG_SIZE_MIN}, {IMG_SIZE_MAX}], got {self.img_size}")
        if (self.low_res == 0) != (self.low_res_epochs == 0):
            raise ImgclsError("config: low_res and low_res_epochs go together (progressive resizing); set both or neither")
        if self.low_res and not IMG_SIZE_MIN <= self.low_res <= IMG_SIZE_MAX:
            raise ImgclsError(f"config: low_res must be 0 (off) or in [{IMG_SIZE_MIN}, {IMG_SIZE_MAX}], got {self.low_res}")
        if not 0 <= self.low_res_epochs < self.epochs:
            raise ImgclsError(f"config: low_res_epochs must be at least 0 and below epochs ({self.epochs}), got {self.low_res_epochs}")
        if self.low_res and self.img_size and self.low_res >= self.img_size:
            raise ImgclsError(f"config: low_res ({self.low_res}) must be below img_size ({self.img_size})")
        if not IMG_SIZE_MIN <= self.max_img_size <= IMG_SIZE_MAX:
            raise ImgclsError(f"config: max_img_size must be in [{IMG_SIZE_MIN}, {IMG_SIZE_MAX}], got {self.max_img_size}")

    def replace(self, **changes: Any) -> TrainConfig:
        return from_dict({**to_dict(self), **changes})


# Recipes set defaults; anything the user states explicitly still wins (see merge order above).
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "none": {},
    # Chosen by bench/tune_recipe.py on validation accuracy alone (mean of seeds 0-2; the validation split is
    # carved from intel-scenes' train/ with split_seed 0; test/ is read once, for the winner only). Candidates,
    # each a change to this recipe with blocks 5-6 trained (freeze 6), validation accuracy mean +- sd:
    # Lite0 94.06 +- 0.63; Lite1 93.19 +- 0.32; Lite2 93.65 +- 0.28; Lite0 at 224 px 94.15 +- 0.35;
    # Lite0 with blocks 3-6 trained (freeze 4) 94.20 +- 0.24: taken. Its test accuracy, read once:
    # 93.56 +- 0.17 % (seeds 93.74, 93.54, 93.40); a run takes about 3.5 minutes on 2 cores from an empty cache.
    # The larger backbones lose at 150 px (their own resolution is 240 and 260 px).
    "fast-finetune": {
        "model": "efficientnet_lite0",  # its ImageNet weights ship in a package: no network needed
        "pretrained": True,
        "freeze": 4,  # stem + blocks 0-2: with flip, their output is computed once (engine/features.py)
        "epochs": 5,
        "optimizer": "adamw",
        "lr": 6e-3,
        "weight_decay": 0.01,
        "warmup_epochs": 0.3,
        "augment": "flip",
        "dropout": 0.2,
        "ema": 0.99,  # ~100 steps: one epoch here; 0.998 lagged the short run by 4+ points of val accuracy
        "tta": True,
        "batch_size": 64,
        # The derived size stops at 160 px: time grows with the pixel count (224 px costs 1.96x 160 px per
        # image), and on intel-scenes' 150 px photos upsampling to 224 px cost 2.2x the time with no gain.
        # Photos larger than 160 px train at 160 px; --img-size 224 keeps more detail at about twice the time.
        "max_img_size": 160,
    },
}

# What `imgcls train DATA` uses when neither --model nor --recipe is stated: pretrained weights that ship in
# a package (no network), a few minutes on a laptop. Naming a model keeps the plain from-scratch defaults.
DEFAULT_RECIPE = "fast-finetune"


_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict = 60, 60, 6, 6


def short(value: Any) -> str:
    """``repr`` cut to a line: a value in an error message must not become the message."""
    return _short.repr(value)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ImgclsError(f"config: {name} must be one of {', '.join(choices)}; got {short(value)}")


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Check and convert one value to the field's declared type (bool, int, float, str, tuple[str])."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int)) for v in value):
            raise ImgclsError(f"config: {name} must be a list of names, got {short(value)}")
        return tuple(str(v) for v in value)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if not isinstance(value, bool):
            raise ImgclsError(f"config: {name} must be true or false, got {short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ImgclsError(f"config: {name} must be an integer, got {short(value)}")
        try:
            return int(value)
        except ValueError:
            raise ImgclsError(f"config: {name} must be an integer, got {short(value)}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ImgclsError(f"config: {name} must be a number, got {short(value)}")
        try:
            return float(value)
        except ValueError:
            raise ImgclsError(f"config: {name} must be a number, got {short(value)}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ImgclsError(f"config: {name} must be text, got {short(value)}")
        return str(value)
    raise TypeError(f"unsupported config type for {name}: {tp}")  # a bug in this file, not user input


_TYPES = typing.get_type_hints(TrainConfig)


def check_keys(d: dict[str, Any], *, where: str) -> None:
    unknown = sorted(set(d) - set(_TYPES))
    if unknown:
        raise ImgclsError(
            f"{where}: unknown key(s) {', '.join(str(k)[:60] for k in unknown[:10])}{' ...' if len(unknown) > 10 else ''}; "
            f"valid keys: {', '.join(field_names())}"
        )


def coerce_dict(d: dict[str, Any], *, where: str) -> dict[str, Any]:
    check_keys(d, where=where)
    return {k: _coerce(k, _TYPES[k], v) for k, v in d.items()}


def from_dict(d: dict[str, Any], *, where: str = "config") -> TrainConfig:
    return TrainConfig(**coerce_dict(d, where=where))


def with_value(cfg: TrainConfig, key: str, value: Any) -> TrainConfig:
    """``cfg`` with one key set from a flag's text or a number, checked as a config file's value is
    (``imgcls eval --max-bad-fraction`` over the run's stored value)."""
    return dataclasses.replace(cfg, **coerce_dict({key: value}, where=f"--{key.replace('_', '-')}"))


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["exclude_classes"] = list(cfg.exclude_classes)
    return d


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes the document holds once every alias is expanded; shared nodes are counted once per use
    but computed once, so an alias bomb is measured in microseconds, not expanded."""
    key = id(node)
    if key not in memo:
        memo[key] = YAML_MAX_NODES + 1  # a node reached again while being measured: a recursive alias
        if isinstance(node, yaml.SequenceNode):
            n = 1 + sum(_expanded_size(v, memo) for v in node.value)
        elif isinstance(node, yaml.MappingNode):
            n = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
        else:
            n = 1
        memo[key] = min(n, YAML_MAX_NODES + 1)
    return memo[key]


def parse_yaml(text: str, *, what: str) -> Any:
    """YAML text as data, never code, refusing documents that aliases expand beyond ``YAML_MAX_NODES``
    (PyYAML has no such limit: 400 bytes of nested aliases make a billion-item list)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > YAML_MAX_NODES:
            raise ImgclsError(f"{what} expands its aliases (&/*) beyond {YAML_MAX_NODES:,} items; refused (an alias bomb?)")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ImgclsError(f"{what} is not valid YAML/JSON: {' '.join(str(e).split())[:300]}") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path, *, what: str) -> Any:
    """Parse a YAML (or JSON) file as data, never code; ``what`` names the file in errors."""
    p = Path(path)
    if not p.is_file():
        raise ImgclsError(f"{what} not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ImgclsError(f"{what} {p} is not UTF-8 text: {e}") from None
    return parse_yaml(text, what=f"{what} {p}")


def read_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of config keys (YAML is a superset of JSON)."""
    p = Path(path)
    d = read_yaml(p, what="config file")
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ImgclsError(f"config file {p} must hold a mapping of keys to values")
    check_keys(d, where=f"config file {p}")
    return d


def parse_set(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are read as YAML scalars/lists (data, never code)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ImgclsError(f"--set takes key=value, got {item!r}")
        key = key.strip().replace("-", "_")
        try:
            out[key] = parse_yaml(raw, what=f"--set {key}") if raw.strip() else ""
        except ImgclsError as e:
            if "alias" in str(e):
                raise
            out[key] = raw
    check_keys(out, where="--set")
    return out


def stated(
    *,
    flags: dict[str, Any],
    file: str | Path | None = None,
    sets: list[str] | None = None,
) -> dict[str, Any]:
    """The keys the user stated in any layer (file < flags < ``--set``), before recipes and defaults."""
    from_file = read_file(file) if file else {}
    return {**from_file, **flags, **parse_set(sets or [])}


def resolve(
    *,
    flags: dict[str, Any],
    file: str | Path | None = None,
    sets: list[str] | None = None,
    default_recipe: str = "none",
) -> TrainConfig:
    """Merge the layers in order; ``flags`` holds only what the user stated explicitly.

    ``default_recipe`` applies when neither a recipe nor a model is stated (``imgcls train DATA``)."""
    explicit = stated(flags=flags, file=file, sets=sets)
    fallback = default_recipe if "model" not in explicit else "none"
    recipe = str(explicit.get("recipe", fallback))
    explicit["recipe"] = recipe
    if recipe not in RECIPE_DEFAULTS:
        _check_choice("recipe", recipe, RECIPES)
    return from_dict({**RECIPE_DEFAULTS[recipe], **explicit})


def dump(cfg: TrainConfig, path: str | Path) -> None:
    """The one writer of a run's ``config.json`` (atomic); :func:`load` reads it back."""
    write_json(path, to_dict(cfg))


def load(path: str | Path) -> TrainConfig:
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImgclsError(f"missing {p}: not an imgcls run folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ImgclsError(f"{p} is damaged: {e}") from None
    if not isinstance(d, dict):
        raise ImgclsError(f"{p} is damaged: expected a mapping")
    return from_dict(d, where=str(p))


__all__ = [
    "TrainConfig",
    "RECIPE_DEFAULTS",
    "from_dict",
    "to_dict",
    "resolve",
    "stated",
    "DEFAULT_RECIPE",
    "dump",
    "load",
    "parse_set",
    "read_file",
    "field_names",
    "coerce_dict",
]
