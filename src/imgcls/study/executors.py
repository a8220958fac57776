"""Where a study's runs execute: here (``local``) or as Ray tasks on one machine or a cluster (``ray``).

Both take the runs :func:`imgcls.study.runner.prepare_runs` left to do and write ordinary run folders;
planning (skip finished runs, continue unfinished ones, refuse stale ones) stays in the runner.

``local``: on CPU (or one GPU) the runs go one after another in this process. With several visible CUDA
devices each run is a subprocess ``python -m imgcls train`` pinned to one device by ``CUDA_VISIBLE_DEVICES``.
With ``jobs`` > 1 (CPU runs) that many subprocesses run side by side, each with its share of the cores as
``OMP_NUM_THREADS`` (a run that starts when fewer are left gets a larger share, and once none is left to
start, the running ones take up the cores of those that end). On two cores, four
ResNet-18 runs with ``jobs`` 2 trained 11 % more images a second and finished 1.08x as fast as one at a
time (``bench/study_jobs.py``). With one visible GPU the ``jobs`` runs share it (not measured here).

``ray``: each run is a Ray task (one GPU each where the cluster has GPUs, else one CPU) that trains in its
worker and writes its run folder under the study folder, which every node must see at the same path
(shared storage). Ray retries a task whose worker died; the retry continues from the run's last
checkpoint. Ray is an optional extra, imported only here and only when asked for.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Protocol

from imgcls import config as config_mod
from imgcls import progress
from imgcls.config import TrainConfig
from imgcls.errors import ImgclsError, Interrupted
from imgcls.study import runner
from imgcls.study.runner import PlannedRun

EXECUTORS = ("local", "ray")
# a worker that dies (killed, out of memory, node lost) is retried this often before the run counts as failed
RAY_MAX_RETRIES = 3


class Executor(Protocol):
    def execute(self, runs: list[PlannedRun], out: Path, *, total: int, done_before: int) -> None:
        """Train and evaluate ``runs`` into their run folders; raise ImgclsError naming any that failed."""


def make_executor(name: str, *, address: str | None = None, jobs: int = 1) -> Executor:
    """The executor called ``name``; fails at once (before anything trains) when it cannot work here."""
    if jobs < 1:
        raise ImgclsError(f"--jobs must be 1 or more, got {jobs}")
    if name == "local":
        if address is not None:
            raise ImgclsError("--address is for --executor ray")
        return LocalExecutor(jobs=jobs)
    if name == "ray":
        if jobs != 1:
            raise ImgclsError("--jobs is for --executor local; Ray runs as many tasks as the cluster has CPUs or GPUs")
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


# --- local: in sequence, one subprocess per GPU, or --jobs subprocesses on the CPU --------------------


class LocalExecutor:
    def __init__(self, *, jobs: int = 1):
        self.jobs = jobs

    def execute(self, runs: list[PlannedRun], out: Path, *, total: int, done_before: int) -> None:
        """Train and evaluate ``runs``; in sequence, one per GPU when several are visible, or ``jobs`` at a time."""
        gpus = cuda_devices(runs)
        if gpus:
            if self.jobs > 1:
                raise ImgclsError(f"--jobs is for runs on the CPU; with {len(gpus)} GPUs the study already runs one run per GPU")
            slots = [(f"GPU {g}", {"CUDA_VISIBLE_DEVICES": g}) for g in gpus]
            progress.say(f"{len(runs)} run(s) on {len(gpus)} GPUs, one run per GPU; logs in each run folder's train.log")
            _execute_parallel(runs, out, slots=slots, total=total, done_before=done_before)
            return
        if self.jobs > 1 and len(runs) > 1:
            n = min(self.jobs, len(runs))
            slots = [(f"slot {i + 1}", {}) for i in range(n)]
            progress.say(f"{len(runs)} run(s), {n} at a time with {cpu_threads(n)} CPU thread(s) each "
                         "(a run that starts with fewer left to run gets more); logs in each run folder's train.log")
            _execute_parallel(runs, out, slots=slots, total=total, done_before=done_before, share_cores=True)
            return
        for i, r in enumerate(runs, start=done_before + 1):
            what = "continuing" if r.state == "resume" else "run"
            progress.say(f"{what} {i}/{total}: {r.arm} seed {r.seed}")
            t0 = time.perf_counter()
            summary = runner.train_one(r.config, run_dir=r.path, resume=r.state == "resume")
            progress.say(f"  {r.arm} seed {r.seed}: {_outcome(summary)} in {time.perf_counter() - t0:.0f}s")


def _outcome(summary: dict | None) -> str:
    acc = summary.get("test_accuracy") if summary else None
    return f"test accuracy {acc:.2%}" if acc is not None else "done"


def _summary(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def share_of_cores(*, slots: int, not_finished: int) -> int:
    """Threads for a run that starts now: the cores shared among the runs that can still run at once."""
    return cpu_threads(max(1, min(slots, not_finished)))


def cpu_threads(jobs: int) -> int:
    """Each of ``jobs`` side-by-side runs gets this many threads: its share of the cores this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // jobs)


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


def _popen(cmd: list[str], *, env: dict[str, str], log) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


class _Children:
    """The runs' subprocesses. SIGINT or SIGTERM to the study starts no new run and is passed on to the running
    ones, which save a checkpoint and stop (engine/train.py); the study then stops as a single run would."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[subprocess.Popen, Path | None] = {}  # each running run and its threads file (share_cores)
        self.seconds: list[float] = []  # how long each ended run took, however it ended
        self.signum: int | None = None
        self.started = 0

    def start(self, cmd: list[str], env: dict[str, str], log, threads_file: Path | None = None) -> subprocess.Popen | None:
        with self.lock:
            if self.signum is not None:
                return None
            proc = _popen(cmd, env=env, log=log)
            self.running[proc] = threads_file
            self.started += 1
            return proc

    def finished(self, proc: subprocess.Popen, seconds: float, *, total: int) -> str | None:
        """``proc`` ended. Once every run has started, the cores it used go to the runs still running
        (through their threads files, engine.runtime.CoreShare); returns a line saying so, if they did."""
        with self.lock:
            self.running.pop(proc, None)
            self.seconds.append(seconds)
            if self.started < total or self.signum is not None:
                return None
            files = [f for p, f in self.running.items() if f is not None and p.poll() is None]
            if not files:
                return None
            threads = cpu_threads(len(files))
            for f in files:
                _write_threads(f, threads)
            return f"  the {len(files)} run(s) still training now use {threads} CPU thread(s) each"

    def eta(self, total: int, slots: int) -> str:
        """Ended runs and a rough time left: the mean run so far, times the runs left, over the slots."""
        with self.lock:
            ended, left = len(self.seconds), total - len(self.seconds)
            mean = sum(self.seconds) / max(ended, 1)
        return f"{ended}/{total} ended" + (f", about {mean * left / slots / 60:.0f} min left" if left else "")

    def stop(self, signum: int, _frame=None) -> None:
        self.signum = signum
        for proc in list(self.running):
            if proc.poll() is None:
                proc.send_signal(signum)

    @contextmanager
    def forwarding_signals(self) -> Iterator[None]:
        previous = {}
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                previous[s] = signal.signal(s, self.stop)
        except ValueError:  # not the main thread (a notebook's worker thread): no handlers
            pass
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _write_threads(path: Path, threads: int) -> None:
    """Replace the file in one step, so that a run reading it sees the old number or the new one."""
    tmp = path.parent / (path.name + ".tmp")  # not with_suffix: an arm "lr-0.1" would lose ".1-seed0"
    tmp.write_text(f"{threads}\n", encoding="utf-8")
    os.replace(tmp, path)


def _execute_parallel(runs: list[PlannedRun], out: Path, *, slots: list[tuple[str, dict[str, str]]], total: int,
                      done_before: int, share_cores: bool = False) -> None:
    """Run ``runs`` as subprocesses, one per slot at a time; a slot is a name and what it adds to the environment.

    ``share_cores`` (CPU runs): a run starts with ``OMP_NUM_THREADS`` = its share of the cores among the runs
    not yet finished, up to one per slot, so a last run that starts alone gets every core. Once no run is left
    to start, the runs still running take up the cores that ended runs leave free: each gets a threads file
    (``IMGCLS_THREADS_FILE``, in a temporary folder) that its training loop reads (engine.runtime.CoreShare)."""
    _decode_once(runs)
    with tempfile.TemporaryDirectory(prefix="imgcls-threads-") as tmp:
        _run_children(runs, out, slots=slots, total=total, done_before=done_before,
                      threads_dir=Path(tmp) if share_cores else None)


def _run_children(runs: list[PlannedRun], out: Path, *, slots: list[tuple[str, dict[str, str]]], total: int,
                  done_before: int, threads_dir: Path | None) -> None:
    from imgcls.engine.runtime import THREADS_FILE_ENV

    free: queue.Queue[tuple[str, dict[str, str]]] = queue.Queue()
    for slot in slots:
        free.put(slot)
    counter = iter(range(done_before + 1, total + 1))
    children = _Children()

    def work(r: PlannedRun) -> tuple[PlannedRun, int | None]:
        name, env_more = free.get()
        try:
            if children.signum is not None:
                return r, None
            r.path.mkdir(parents=True, exist_ok=True)
            cmd = _subprocess_command(r, out)
            where = name
            env = {**os.environ, **env_more}
            threads_file = None
            if threads_dir is not None:
                with children.lock:
                    threads = share_of_cores(slots=len(slots), not_finished=len(runs) - len(children.seconds))
                env["OMP_NUM_THREADS"] = str(threads)
                threads_file = threads_dir / f"{r.arm}-seed{r.seed}"
                env[THREADS_FILE_ENV] = str(threads_file)
                where = f"{name}, {threads} thread(s)"
            t0 = time.perf_counter()
            with (r.path / "train.log").open("a", encoding="utf-8") as log:
                proc = children.start(cmd, env, log, threads_file)
                if proc is None:
                    return r, None
                what = "continuing" if r.state == "resume" else "run"
                progress.say(f"{what} {next(counter)}/{total}: {r.arm} seed {r.seed} ({where})")
                rc = proc.wait()
                more_cores = children.finished(proc, time.perf_counter() - t0, total=len(runs))
            outcome = _outcome(_summary(r.path)) if rc == 0 else f"stopped (exit {rc})" if children.signum else f"failed (exit {rc})"
            # after a signal the runs are stopping, not ending: no count of ended runs and no time left
            progress.say(f"  {r.arm} seed {r.seed}: {outcome} in {time.perf_counter() - t0:.0f}s"
                         + ("" if children.signum else f"; {children.eta(len(runs), len(slots))}"))
            if more_cores:
                progress.say(more_cores)
            return r, rc
        finally:
            free.put((name, env_more))

    with children.forwarding_signals(), ThreadPoolExecutor(max_workers=len(slots)) as pool:
        results = list(pool.map(work, runs))
    if children.signum is not None:
        raise Interrupted(children.signum, "during the study's runs (each running one saved a checkpoint)")
    failed = [(r, f"exit {rc}") for r, rc in results if rc]
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
            progress.say(f"  {finished}/{total} {r.arm} seed {r.seed}: {_outcome(summary)} ({time.perf_counter() - t0:.0f}s into the study)")
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
