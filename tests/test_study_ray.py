"""Studies on Ray: a local Ray instance (2 CPUs, loopback only) runs a 2-arm x 2-seed study, one of its
workers is killed mid-run, and the retried task continues that run from its checkpoint."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml

from conftest import make_split_root
from imgcls.errors import ImgclsError
from imgcls.study.core import run_study
from imgcls.study.executors import RayExecutor, make_executor, ray_task_name


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _worker_pid(title: str) -> int | None:
    """The process whose title is ``title``: a Ray worker renames itself ``ray::<task name>`` while it runs one."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.rstrip(b"\0") == title.encode():
                return int(entry.name)
    return None


def _kill_after_first_epoch(run: Path, title: str, seen: dict, stop: threading.Event) -> None:
    """SIGKILL the worker training ``run`` as soon as its first epoch is checkpointed (metrics.csv is
    written right after checkpoints/last.safetensors), remembering the epochs it had logged."""
    metrics = run / "metrics.csv"
    while not stop.is_set():
        if metrics.is_file() and not (run / "summary.json").exists():
            pid = _worker_pid(title)
            if pid is not None:
                seen["before"] = _rows(metrics)
                os.kill(pid, signal.SIGKILL)
                seen["pid"] = pid
                return
        time.sleep(0.01)


@pytest.mark.slow
def test_ray_study_survives_a_killed_worker(tmp_path, monkeypatch):
    make_split_root(tmp_path / "data", classes=("cat", "dog"), train=16, test=4)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "tiny-ray", "data": "data", "seeds": [0, 1], "panel_per_class": 1,
        "base": {"model": "resnet18", "img_size": 32, "epochs": 3, "batch_size": 8, "precision": "fp32", "val_fraction": 0.25},
        "arms": {"baseline": {}, "sgd": {"optimizer": "sgd", "lr": 0.01}},
    }), encoding="utf-8")
    out = tmp_path / "out"
    victim = out / "runs" / "baseline" / "seed0"
    # the workers inherit this process's environment when ray.init starts them: let them log into train.log
    monkeypatch.setenv("IMGCLS_QUIET", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine; Ray talks over loopback only
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    seen: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=_kill_after_first_epoch, args=(victim, f"ray::{ray_task_name('baseline', 0)}", seen, stop))
    try:
        killer.start()
        result = run_study(spec_path, out, executor=RayExecutor())
    finally:
        stop.set()
        killer.join()
        ray.shutdown()

    assert "pid" in seen, "the worker of baseline seed 0 was never seen between its first checkpoint and its end"
    assert result.trained == 4 and not result.missing
    assert all((out / "runs" / arm / f"seed{s}" / "summary.json").is_file() for arm in ("baseline", "sgd") for s in (0, 1))
    # the retry continued the run: the epochs logged before the kill are kept as they were, the rest follow
    after = _rows(victim / "metrics.csv")
    assert [int(r["epoch"]) for r in after] == [1, 2, 3]
    assert after[: len(seen["before"])] == seen["before"]
    log = (victim / "train.log").read_text()
    assert log.count("resumed") == 1, log
    assert f"at epoch {len(seen['before']) + 1}" in log or f"at epoch {len(seen['before']) + 2}" in log, log


def test_ray_executor_without_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    with pytest.raises(ImgclsError, match=r"pip install -e '\.\[ray\]'"):
        make_executor("ray")


def test_cli_without_ray_is_a_one_line_error(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({"data": "data", "arms": {"baseline": {}}}), encoding="utf-8")
    code = ("import sys; sys.modules['ray'] = None; from imgcls.cli import main; "
            f"sys.exit(main(['study', {str(spec_path)!r}, '--executor', 'ray']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["imgcls: error: --executor ray needs Ray: pip install -e '.[ray]'"]


def test_address_needs_the_ray_executor():
    with pytest.raises(ImgclsError, match="--address is for --executor ray"):
        make_executor("local", address="auto")


def test_jobs_is_for_the_local_executor():
    with pytest.raises(ImgclsError, match="--jobs is for --executor local"):
        make_executor("ray", jobs=2)
