"""Run every arm x seed of a study, resumably: finished runs are skipped, unfinished ones continued,
and runs whose stored config no longer matches the spec are stale (refused unless asked to redo them).

On CPU (or one GPU) the runs go one after another in this process. With several visible CUDA devices
each run is a subprocess ``python -m imgcls train`` pinned to one device by ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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


def cuda_devices(runs: list[PlannedRun]) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` values for one run per GPU; empty unless at least two GPUs are visible
    and every run asks for ``device: auto`` or ``cuda`` (a pinned ``cuda:N`` runs in sequence)."""
    if not runs or any(r.config.device not in ("auto", "cuda") for r in runs):
        return []
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA setup just means: run in sequence
        return []
    if n < 2:
        return []
    # keep the user's own mask: with CUDA_VISIBLE_DEVICES=2,3 the runs go to physical GPUs 2 and 3
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[:n] if visible else [str(i) for i in range(n)]


def execute(runs: list[PlannedRun], out: Path, *, total: int, done_before: int) -> None:
    """Train and evaluate ``runs``; in sequence, or one per GPU when several are visible."""
    gpus = cuda_devices(runs)
    if gpus:
        _execute_parallel(runs, out, gpus=gpus, total=total, done_before=done_before)
        return
    for i, r in enumerate(runs, start=done_before + 1):
        what = "continuing" if r.state == "resume" else "run"
        progress.say(f"{what} {i}/{total}: {r.arm} seed {r.seed}")
        t0 = time.perf_counter()
        summary = train_one(r.config, run_dir=r.path, resume=r.state == "resume")
        acc = summary.get("test_accuracy") if summary else None
        progress.say(f"  {r.arm} seed {r.seed}: " + (f"test accuracy {acc:.2%}" if acc is not None else "done") + f" in {time.perf_counter() - t0:.0f}s")


def _subprocess_command(r: PlannedRun, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "imgcls", "train", "--out", str(r.path)]
    if r.state == "resume":
        return cmd + ["--resume"]
    cfg_file = out / "configs" / f"{r.arm}-seed{r.seed}.json"
    cfg_file.parent.mkdir(parents=True, exist_ok=True)
    config_mod.dump(r.config, cfg_file)
    return cmd + ["--config", str(cfg_file)]


def _execute_parallel(runs: list[PlannedRun], out: Path, *, gpus: list[str], total: int, done_before: int) -> None:
    # decode each image size once here, so the parallel runs read the cache instead of all decoding it at once
    from imgcls.data import prepare

    for cfg in {(r.config.data, r.config.img_size): r.config for r in runs}.values():
        prepare(cfg)
    free: queue.Queue[str] = queue.Queue()
    for g in gpus:
        free.put(g)
    progress.say(f"{len(runs)} run(s) on {len(gpus)} GPUs, one run per GPU; logs in each run folder's train.log")
    counter = iter(range(done_before + 1, total + 1))

    def work(r: PlannedRun) -> tuple[PlannedRun, int]:
        gpu = free.get()
        try:
            r.path.mkdir(parents=True, exist_ok=True)
            cmd = _subprocess_command(r, out)
            progress.say(f"run {next(counter)}/{total}: {r.arm} seed {r.seed} on GPU {gpu}")
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
            with (r.path / "train.log").open("a", encoding="utf-8") as log:
                rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
            progress.say(f"  {r.arm} seed {r.seed}: {'done' if rc == 0 else f'failed (exit {rc})'}")
            return r, rc
        finally:
            free.put(gpu)

    with ThreadPoolExecutor(max_workers=len(gpus)) as pool:
        results = list(pool.map(work, runs))
    failed = [(r, rc) for r, rc in results if rc != 0]
    if failed:
        lines = "\n".join(f"  {r.arm} seed {r.seed}: exit {rc}, see {r.path / 'train.log'}" for r, rc in failed)
        raise ImgclsError(f"{len(failed)} run(s) failed:\n{lines}")
