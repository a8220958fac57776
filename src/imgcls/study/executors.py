"""Where a study's runs execute: here (``local``) or as Ray tasks on one machine or a cluster (``ray``).

Both take the runs :func:`imgcls.study.runner.prepare_runs` left to do and write ordinary run folders;
planning (skip finished runs, continue unfinished ones, refuse stale ones) stays in the runner.

``local``: on CPU (or one GPU) the runs go one after another in this process. With several visible CUDA
devices each run is a subprocess ``python -m imgcls train`` pinned to one device by ``CUDA_VISIBLE_DEVICES``.

``ray``: each run is a Ray task (one GPU each where the cluster has GPUs, else one CPU) that trains in its
worker and writes its run folder under the study folder, which every node must see at the same path
(shared storage). Ray retries a task whose worker died; the retry continues from the run's last
checkpoint. Ray is an optional extra, imported only here and only when asked for.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Protocol

from imgcls import config as config_mod
from imgcls import progress
from imgcls.config import TrainConfig
from imgcls.errors import ImgclsError
from imgcls.study import runner
from imgcls.study.runner import PlannedRun

EXECUTORS = ("local", "ray")
# a worker that dies (killed, out of memory, node lost) is retried this often before the run counts as failed
RAY_MAX_RETRIES = 3


class Executor(Protocol):
    def execute(self, runs: list[PlannedRun], out: Path, *, total: int, done_before: int) -> None:
        """Train and evaluate ``runs`` into their run folders; raise ImgclsError naming any that failed."""


def make_executor(name: str, *, address: str | None = None) -> Executor:
    """The executor called ``name``; fails at once (before anything trains) when it cannot work here."""
    if name == "local":
        if address is not None:
            raise ImgclsError("--address is for --executor ray")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address=address)
    raise ImgclsError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")


def _decode_once(runs: list[PlannedRun]) -> None:
    """Decode each image size once here, so that parallel runs read the cache instead of all decoding it at once."""
    from imgcls.data import prepare

    for cfg in {(r.config.data, r.config.img_size): r.config for r in runs}.values():
        prepare(cfg)


def _failed(failed: list[tuple[PlannedRun, str]]) -> ImgclsError:
    lines = "\n".join(f"  {r.arm} seed {r.seed}: {why}, see {r.path / 'train.log'}" for r, why in failed)
    return ImgclsError(f"{len(failed)} run(s) failed:\n{lines}")


# --- local: in sequence, or one subprocess per GPU ------------------------------------------------------


class LocalExecutor:
    def execute(self, runs: list[PlannedRun], out: Path, *, total: int, done_before: int) -> None:
        """Train and evaluate ``runs``; in sequence, or one per GPU when several are visible."""
        gpus = cuda_devices(runs)
        if gpus:
            _execute_parallel(runs, out, gpus=gpus, total=total, done_before=done_before)
            return
        for i, r in enumerate(runs, start=done_before + 1):
            what = "continuing" if r.state == "resume" else "run"
            progress.say(f"{what} {i}/{total}: {r.arm} seed {r.seed}")
            t0 = time.perf_counter()
            summary = runner.train_one(r.config, run_dir=r.path, resume=r.state == "resume")
            acc = summary.get("test_accuracy") if summary else None
            progress.say(f"  {r.arm} seed {r.seed}: " + (f"test accuracy {acc:.2%}" if acc is not None else "done") + f" in {time.perf_counter() - t0:.0f}s")


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


def _subprocess_command(r: PlannedRun, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "imgcls", "train", "--out", str(r.path)]
    if r.state == "resume":
        return cmd + ["--resume"]
    cfg_file = out / "configs" / f"{r.arm}-seed{r.seed}.json"
    cfg_file.parent.mkdir(parents=True, exist_ok=True)
    config_mod.dump(r.config, cfg_file)
    return cmd + ["--config", str(cfg_file)]


def _execute_parallel(runs: list[PlannedRun], out: Path, *, gpus: list[str], total: int, done_before: int) -> None:
    _decode_once(runs)
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
    failed = [(r, f"exit {rc}") for r, rc in results if rc != 0]
    if failed:
        raise _failed(failed)


# --- ray: one task per run -----------------------------------------------------------------------------


def ray_task_name(arm: str, seed: int) -> str:
    """The task's name; Ray also shows it as the worker's process title (``ray::<name>``) while it runs."""
    return f"imgcls {arm} seed {seed}"


def train_in_worker(cfg: TrainConfig, run_dir: str) -> dict:
    """One run inside a Ray worker, its output appended to the run folder's train.log.

    Whether to resume is decided here, not by the driver: a retry after the worker died must continue
    from the checkpoint that the dead attempt saved, whatever the state was when the study was planned.
    """
    path = Path(run_dir)
    resume = (path / "checkpoints" / "last.safetensors").is_file()
    path.mkdir(parents=True, exist_ok=True)
    # a worker runs one task at a time, so redirecting this process's streams is confined to this run
    with (path / "train.log").open("a", encoding="utf-8", buffering=1) as log, redirect_stdout(log), redirect_stderr(log):
        return runner.train_one(cfg, run_dir=path, resume=resume)


class RayExecutor:
    def __init__(self, *, address: str | None = None):
        try:
            import ray  # noqa: F401 - only to fail early with the install hint
        except ImportError:
            raise ImgclsError("--executor ray needs Ray: pip install -e '.[ray]'") from None
        self.address = address

    def _connect(self) -> bool:
        """Connect to the cluster at ``address``, or start a local Ray instance; True when this call started it."""
        import ray

        if ray.is_initialized():  # the caller (a notebook, a test) already chose the instance
            return False
        try:
            if self.address is None:
                ray.init(include_dashboard=False)
            else:
                ray.init(address=self.address)
        except ConnectionError as e:
            first = (str(e).strip().strip("'\"").splitlines() or [type(e).__name__])[0]
            raise ImgclsError(f"cannot reach a Ray cluster at {self.address} ({first}); start one with `ray start --head`, "
                              "or leave out --address for a local one") from None
        return True

    def execute(self, runs: list[PlannedRun], out: Path, *, total: int, done_before: int) -> None:
        import ray

        if not runs:
            return
        started = self._connect()
        try:
            self._run_tasks(runs, total=total, done_before=done_before)
        finally:
            if started:
                ray.shutdown()

    def _run_tasks(self, runs: list[PlannedRun], *, total: int, done_before: int) -> None:
        import ray

        # the workers may run in another folder or on another node: every path they get is absolute
        _decode_once(runs)
        gpus = ray.cluster_resources().get("GPU", 0) >= 1
        task = ray.remote(max_retries=RAY_MAX_RETRIES)(train_in_worker)
        pending = {}
        for r in runs:
            on_gpu = gpus and r.config.device != "cpu"
            # Ray masks the GPUs so that the task's one GPU is cuda:0; device is not part of what a run computes
            cfg = r.config.replace(device="cuda") if on_gpu else r.config
            resources = {"num_gpus": 1} if on_gpu else {"num_cpus": 1}
            ref = task.options(name=ray_task_name(r.arm, r.seed), **resources).remote(cfg, str(r.path.resolve()))
            pending[ref] = r
        where = "one GPU" if gpus else "one CPU"
        progress.say(f"{len(runs)} run(s) as Ray tasks, {where} each; logs in each run folder's train.log")
        failed = []
        finished = done_before
        t0 = time.perf_counter()
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            r = pending.pop(ref)
            finished += 1
            try:
                summary = ray.get(ref)
            except ray.exceptions.RayError as e:
                why = _ray_failure(e)
                failed.append((r, why))
                progress.say(f"  {finished}/{total} {r.arm} seed {r.seed}: failed: {why}")
                continue
            acc = summary.get("test_accuracy") if summary else None
            progress.say(f"  {finished}/{total} {r.arm} seed {r.seed}: " + (f"test accuracy {acc:.2%}" if acc is not None else "done")
                         + f" ({time.perf_counter() - t0:.0f}s into the study)")
        if failed:
            raise _failed(failed)


def _ray_failure(e: Exception) -> str:
    """One line for a failed task: the run's own error where it raised one, else what happened to its worker."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, ImgclsError):
        return str(cause).splitlines()[0]
    if cause is not None:
        return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}".rstrip(": ")
    # e.g. WorkerCrashedError once the worker died on every one of its RAY_MAX_RETRIES + 1 attempts
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0]}" if first else type(e).__name__
