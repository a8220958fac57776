"""Run every arm x seed of a study, resumably: finished runs are skipped, unfinished ones continued,
and runs whose stored config no longer matches the spec are stale (refused unless asked to redo them).
Where the runs left to do execute (here, or as Ray tasks) is :mod:`imgcls.study.executors`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from imgcls import config as config_mod
from imgcls import progress
from imgcls.config import TrainConfig
from imgcls.errors import ImgclsError
from imgcls.study.spec import Study, run_dir

# how a run was launched does not change what it computes
IGNORED_KEYS = ("device",)


@dataclass(frozen=True)
class PlannedRun:
    arm: str
    seed: int
    config: TrainConfig
    path: Path
    state: str  # done | resume | new | stale
    reason: str = ""


def config_differences(wanted: TrainConfig, stored: dict) -> list[str]:
    """Keys whose stored value differs from the spec's; ``img_size: 0`` (auto) matches any stored size,
    and a key newer than the stored run matches when the spec leaves it at its default."""
    defaults = config_mod.to_dict(TrainConfig())
    out = []
    for key, value in config_mod.to_dict(wanted).items():
        if key in IGNORED_KEYS or (key == "img_size" and value == 0):
            continue
        if key not in stored:
            if value != defaults[key]:
                out.append(f"{key}: (not stored) -> {value!r}")
        elif stored[key] != value:
            out.append(f"{key}: {stored[key]!r} -> {value!r}")
    return out


def _stored_config(path: Path) -> dict | None:
    try:
        d = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return d if isinstance(d, dict) else None


def plan(study: Study, out: Path) -> list[PlannedRun]:
    """The state of every run folder of the study, without changing anything."""
    runs = []
    for arm, seed in study.runs():
        cfg = study.config(arm, seed)
        path = run_dir(out, arm, seed)
        finished = (path / "summary.json").is_file()
        resumable = (path / "checkpoints" / "last.safetensors").is_file()
        stored = _stored_config(path)
        if stored is None:
            state, reason = ("stale", "config.json is missing or damaged") if (finished or resumable) else ("new", "")
        else:
            diff = config_differences(cfg, stored)
            if diff:
                state, reason = "stale", "; ".join(diff)
            else:
                state, reason = ("done" if finished else "resume" if resumable else "new"), ""
        runs.append(PlannedRun(arm, seed, cfg, path, state, reason))
    return runs


def _move_aside(path: Path, out: Path) -> Path:
    """Keep a stale or broken run (it may be worth a look) under ``out/stale/``, never overwrite it."""
    dest = out / "stale" / path.parent.name / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    k = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.name}-{k}")
        k += 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), str(dest))
    return dest


def prepare_runs(runs: list[PlannedRun], out: Path, *, rerun_stale: bool) -> list[PlannedRun]:
    """The runs still to do; stale runs are refused, or moved aside with ``rerun_stale``."""
    stale = [r for r in runs if r.state == "stale"]
    if stale and not rerun_stale:
        lines = "\n".join(f"  {r.arm} seed {r.seed} ({r.path}): {r.reason}" for r in stale)
        raise ImgclsError(
            f"{len(stale)} finished or started run(s) no longer match the spec:\n{lines}\n"
            "pass --rerun-stale to move them to stale/ and redo them, or restore the spec"
        )
    todo = []
    for r in runs:
        if r.state == "done":
            continue
        if r.state == "stale":
            dest = _move_aside(r.path, out)
            progress.say(f"stale run {r.arm} seed {r.seed} moved to {dest}")
            r = PlannedRun(r.arm, r.seed, r.config, r.path, "new")
        elif r.state == "new" and r.path.exists():
            # started but killed before its first checkpoint: nothing to continue from
            _move_aside(r.path, out)
        todo.append(r)
    return todo


def train_one(cfg: TrainConfig, *, run_dir: Path, resume: bool) -> dict:
    """One run in this process (the seam tests replace to prove a rerun trains nothing)."""
    from imgcls.runs import train_and_evaluate

    return train_and_evaluate(cfg, run_dir=run_dir, resume=resume)
