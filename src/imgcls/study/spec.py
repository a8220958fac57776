"""A study spec: a YAML file naming a base config, arms that change it and seeds to repeat each arm.

```yaml
name: seed-ablations
data: ../shared/datasets/intel-scenes   # relative to this file's folder; or absolute; or fashion-mnist
base: {model: resnet50, epochs: 24}
seeds: [0, 1, 2]
arms:
  baseline: {}
  no-augment: {augment: none}
baseline: baseline                      # optional: default the arm named baseline, else the first arm
```

Every arm x seed becomes one ordinary run (``runs/<arm>/seed<k>``) with a fully resolved
:class:`~imgcls.config.TrainConfig`; the spec is checked completely before anything trains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from imgcls import config as config_mod
from imgcls.config import TrainConfig, read_yaml
from imgcls.errors import ImgclsError

TOP_KEYS = ("name", "data", "base", "seeds", "arms", "baseline", "panel_per_class", "panel_layer")
# set by the study itself, never by base or an arm
RESERVED = ("data", "seed")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
BUILTIN_DATA = ("fashion-mnist",)


@dataclass(frozen=True)
class Study:
    name: str
    data: str  # resolved: absolute path or a built-in name
    base: dict[str, Any]
    seeds: tuple[int, ...]
    arms: dict[str, dict[str, Any]]  # arm name -> its overrides of base, in spec order
    baseline: str
    panel_per_class: int = 2
    panel_layer: str = ""  # Grad-CAM layer; "" = the explainer's default (the family table's, else the last feature map)
    spec_path: str = ""

    def config(self, arm: str, seed: int) -> TrainConfig:
        """The run config of one arm and seed (already validated by :func:`load_spec`)."""
        stated = {**self.base, **self.arms[arm], "data": self.data, "seed": seed}
        # a recipe named in the spec sets its defaults under the spec's own keys, as it does for `imgcls train`
        recipe = config_mod.RECIPE_DEFAULTS.get(str(stated.get("recipe", "none")), {})
        return config_mod.from_dict({**recipe, **stated})

    def runs(self) -> list[tuple[str, int]]:
        """Every (arm, seed), seed-major so that a study stopped half-way has every arm at the first seeds."""
        return [(arm, seed) for seed in self.seeds for arm in self.arms]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "spec": self.spec_path,
            "data": self.data,
            "base": self.base,
            "seeds": list(self.seeds),
            "arms": self.arms,
            "baseline": self.baseline,
            "panel_per_class": self.panel_per_class,
            "panel_layer": self.panel_layer,
            "configs": {arm: config_mod.to_dict(self.config(arm, self.seeds[0])) | {"seed": "per run"} for arm in self.arms},
        }


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / "runs" / arm / f"seed{seed}"


def _mapping(value: Any, *, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ImgclsError(f"{where} must be a mapping of config keys to values, got {type(value).__name__}")
    return {str(k).replace("-", "_"): v for k, v in value.items()}


def _overrides(value: Any, *, where: str) -> dict[str, Any]:
    d = _mapping(value, where=where)
    for key in RESERVED:
        if key in d:
            raise ImgclsError(f"{where}: {key} is set by the study ({'top-level data:' if key == 'data' else 'seeds:'}), not here")
    return config_mod.coerce_dict(d, where=where)


def resolve_data(data: Any, spec_dir: Path) -> str:
    if not isinstance(data, str) or not data.strip():
        raise ImgclsError("study spec: data must be a path (relative to the spec's folder) or fashion-mnist")
    if data in BUILTIN_DATA:
        return data
    p = Path(data).expanduser()
    return str((p if p.is_absolute() else spec_dir / p).resolve())


def parse_spec(raw: Any, *, spec_dir: Path, spec_path: str = "") -> Study:
    """Validate a loaded spec mapping; every error names the key and, where there is one, the arm."""
    if not isinstance(raw, dict):
        raise ImgclsError("study spec must be a mapping with name, data, base, seeds and arms")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ImgclsError(f"study spec: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(TOP_KEYS)}")
    name = str(raw.get("name") or (Path(spec_path).stem if spec_path else "study"))
    if "data" not in raw:
        raise ImgclsError("study spec: data is missing (a folder, a CSV, or fashion-mnist)")
    data = resolve_data(raw["data"], spec_dir)
    base = _overrides(raw.get("base"), where="study spec base")

    seeds_raw = raw.get("seeds", [0])
    if isinstance(seeds_raw, int) and not isinstance(seeds_raw, bool):
        seeds_raw = [seeds_raw]
    if not isinstance(seeds_raw, list) or not seeds_raw or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds_raw):
        raise ImgclsError(f"study spec: seeds must be a non-empty list of non-negative integers, got {seeds_raw!r}")
    if len(set(seeds_raw)) != len(seeds_raw):
        raise ImgclsError(f"study spec: seeds repeat a value: {seeds_raw}")

    arms_raw = raw.get("arms")
    if not isinstance(arms_raw, dict) or not arms_raw:
        raise ImgclsError("study spec: arms must be a non-empty mapping of arm name to config changes")
    arms: dict[str, dict[str, Any]] = {}
    for arm, changes in arms_raw.items():
        arm = str(arm)
        if not _NAME.match(arm):
            raise ImgclsError(f"study spec: arm name {arm!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
        arms[arm] = _overrides(changes, where=f"study spec arm {arm!r}")

    baseline = str(raw.get("baseline") or ("baseline" if "baseline" in arms else next(iter(arms))))
    if baseline not in arms:
        raise ImgclsError(f"study spec: baseline {baseline!r} is not one of the arms ({', '.join(arms)})")
    per_class = raw.get("panel_per_class", 2)
    if not isinstance(per_class, int) or isinstance(per_class, bool) or per_class < 0:
        raise ImgclsError(f"study spec: panel_per_class must be a non-negative integer, got {per_class!r}")

    panel_layer = raw.get("panel_layer") or ""
    if not isinstance(panel_layer, str):
        raise ImgclsError(f"study spec: panel_layer must be a module name such as layer3, got {panel_layer!r}")
    study = Study(
        name=name, data=data, base=base, seeds=tuple(seeds_raw), arms=arms, baseline=baseline,
        panel_per_class=per_class, panel_layer=panel_layer, spec_path=spec_path,
    )
    for arm in arms:  # type and range checks of every resolved config, before anything trains
        try:
            study.config(arm, study.seeds[0])
        except ImgclsError as e:
            raise ImgclsError(f"study spec arm {arm!r}: {e}") from None
    return study


def load_spec(path: str | Path, *, data: str | None = None, sets: list[str] | None = None) -> Study:
    """Read and validate a study spec file.

    ``data`` replaces the spec's data (a path relative to the current folder, or fashion-mnist) and ``sets``
    (``key=value``, as ``train --set``) change the base config of every arm: one spec serves any folder."""
    p = Path(path)
    raw = read_yaml(p, what="study spec")
    if isinstance(raw, dict) and (data is not None or sets):
        raw = dict(raw)
        if data is not None:
            raw["data"] = data if data in BUILTIN_DATA else str(Path(data).expanduser().resolve())
        if sets:
            raw["base"] = {**_mapping(raw.get("base"), where="study spec base"), **config_mod.parse_set(sets)}
    return parse_spec(raw, spec_dir=p.resolve().parent, spec_path=str(p.resolve()))
