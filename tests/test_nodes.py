"""Several nodes simulated on one machine: each "node" is its own set of processes with its own decode cache
(IMGCLS_CACHE) and, for torchrun, its own working folder, so a relative --out is a run folder only that node
sees. The collectives go over gloo on loopback."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import imgcls
from imgcls.engine import checkpoint as ckpt
from conftest import make_split_root

SRC = str(Path(imgcls.__file__).resolve().parents[1])  # this tree's code, from any working folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """Every process's (stdout, stderr); past ``timeout`` the ones left are stopped (torchrun passes the
    SIGTERM on to its workers, which it starts in their own sessions) and the test fails."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()


def _env(**extra: str) -> dict:
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


# One process of a 2-node x 2-rank job that only prepares the data, counting the files it decodes itself
# (the real decoder, counted on the way through).
PREPARE = """
import hashlib, json, sys
import imgcls.data.cache as cache
from imgcls.config import TrainConfig
from imgcls.engine import runtime as rt_mod
from imgcls.engine.train import prepare_on_each_node

decoded = []
real = cache._decode_one
cache._decode_one = lambda path, *a: decoded.append(path) or real(path, *a)
rt = rt_mod.setup("cpu")
data = prepare_on_each_node(TrainConfig(data=sys.argv[1], img_size=32), rt)
pixels = hashlib.blake2b(data.train.images[:].numpy().tobytes() + data.test.images[:].numpy().tobytes()).hexdigest()
print(json.dumps({"rank": rt.rank, "decoded": len(decoded), "pixels": pixels}), flush=True)
rt_mod.teardown(rt)
"""


def _prepare_on_two_nodes(tmp_path: Path, data: Path, caches: list[Path]) -> list[dict]:
    """Ranks 0, 1 on node 0 and 2, 3 on node 1 (torchrun's numbering), node n using caches[n]."""
    port = str(free_port())
    procs = []
    for rank in range(4):
        node, local = divmod(rank, 2)
        env = _env(WORLD_SIZE="4", RANK=str(rank), LOCAL_RANK=str(local), LOCAL_WORLD_SIZE="2", GROUP_RANK=str(node),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, IMGCLS_CACHE=str(caches[node]))
        procs.append(subprocess.Popen([sys.executable, "-c", PREPARE, str(data)], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = _finish(procs, timeout=900)
    assert all(p.returncode == 0 for p in procs), [err[-1500:] for _, err in outs]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


@pytest.mark.slow
def test_each_node_fills_its_own_cache_once(tmp_path):
    """Per-node caches: each node's first rank (global 0 and 2) decodes every file into its node's cache and
    the node's second rank reads it; nobody else decodes. Every rank gets the same pixels."""
    data = make_split_root(tmp_path / "d", train=6, test=2)
    n_files = 3 * (6 + 2)
    got = _prepare_on_two_nodes(tmp_path, data, [tmp_path / "cache0", tmp_path / "cache1"])
    assert [g["decoded"] for g in got] == [n_files, 0, n_files, 0]
    assert len({g["pixels"] for g in got}) == 1
    for node in (0, 1):
        assert len(list((tmp_path / f"cache{node}" / "entries").iterdir())) == 2  # train and test pools


@pytest.mark.slow
def test_nodes_sharing_one_cache_decode_once(tmp_path):
    """One cache folder for both nodes: their first ranks prepare at the same time, take turns on the
    cache's lock, and only one of them decodes."""
    data = make_split_root(tmp_path / "d", train=6, test=2)
    shared = tmp_path / "cache"
    got = _prepare_on_two_nodes(tmp_path, data, [shared, shared])
    decoded = [g["decoded"] for g in got]
    assert sorted(decoded) == [0, 0, 0, 3 * (6 + 2)] and decoded[1] == decoded[3] == 0
    assert len({g["pixels"] for g in got}) == 1
    assert len(list((shared / "entries").iterdir())) == 2
    assert not [p for p in shared.rglob("*") if p.name.startswith((".tmp", ".trash")) or p.suffix == ".lock"]


# -- the whole of `imgcls train` under torchrun ----------------------------------------------------------

TRAIN = ["-m", "imgcls", "train", "DATA", "--out", "run", "--model", "resnet10t", "--img-size", "32", "--epochs", "2",
         "--batch-size", "8", "--precision", "fp32", "--seed", "3"]


def _torchrun(*, nnodes: int, nproc: int, node_rank: int, port: int) -> list[str]:
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--nnodes", str(nnodes), "--node_rank", str(node_rank), "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port)]


def _train_args(data: Path) -> list[str]:
    return [str(data) if a == "DATA" else a for a in TRAIN]


def _figures(run: Path) -> tuple[dict, list[dict]]:
    tensors, _ = ckpt.load(run / "checkpoints" / "last.safetensors")
    weights = {k: v for k, v in tensors.items() if k.startswith("model.")}
    with open(run / "metrics.csv", newline="") as f:
        rows = [{k: r[k] for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")} for r in csv.DictReader(f)]
    return weights, rows


@pytest.fixture(scope="module")
def one_node_run(tmp_path_factory) -> tuple[Path, tuple[dict, list[dict]]]:
    """The reference: one node, two processes."""
    root = tmp_path_factory.mktemp("one-node")
    data = make_split_root(root / "d", train=20, test=4)
    r = subprocess.run(_torchrun(nnodes=1, nproc=2, node_rank=0, port=free_port()) + _train_args(data), cwd=root,
                       capture_output=True, text=True, timeout=900, env=_env(IMGCLS_CACHE=str(root / "cache")))
    assert r.returncode == 0, r.stderr[-2000:]
    return data, _figures(root / "run")


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["per-node", "shared"])
def test_two_nodes_train_as_one_node_with_two_processes(tmp_path, one_node_run, cache):
    """Two torchrun launches, --nnodes 2 and --node_rank 0/1, one process each, each "node" in its own
    working folder: global rank 0 writes the whole run into node 0's folder and rank 1 writes nothing into
    node 1's; every node ends with a usable cache (its own, or the shared one filled once); and the
    weights and per-epoch figures are those of the same seed on one node with two processes."""
    data, (ref_weights, ref_rows) = one_node_run
    port = free_port()
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    procs = []
    for node_rank, folder in enumerate(nodes):
        folder.mkdir()
        cache_dir = folder / "cache" if cache == "per-node" else tmp_path / "cache"
        procs.append(subprocess.Popen(
            _torchrun(nnodes=2, nproc=1, node_rank=node_rank, port=port) + _train_args(data), cwd=folder,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(IMGCLS_CACHE=str(cache_dir)),
        ))
    outs = _finish(procs, timeout=900)
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]

    run = nodes[0] / "run"
    assert (run / "summary.json").exists() and (run / "eval" / "metrics.json").exists()
    assert not (nodes[1] / "run").exists()  # only global rank 0 writes the run folder
    caches = [n / "cache" for n in nodes] if cache == "per-node" else [tmp_path / "cache"]
    for c in caches:
        assert len(list((c / "entries").iterdir())) == 2  # the train and test pools, each decoded once here
    weights, rows = _figures(run)
    assert rows == ref_rows
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)


@pytest.mark.slow
def test_data_missing_on_one_node_stops_every_rank_with_its_message(tmp_path):
    """DATA is a relative path that only node 0's folder holds: rank 1 fails to find it, and rank 0 stops
    too, with rank 1's message and host, rather than waiting on it or failing on a closed connection."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for folder in nodes:
        folder.mkdir()
    make_split_root(nodes[0] / "d", train=4, test=1)
    port = free_port()
    procs = [subprocess.Popen(_torchrun(nnodes=2, nproc=1, node_rank=n, port=port) + [a if a != "DATA" else "d" for a in TRAIN],
                              cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(IMGCLS_CACHE=str(folder / "cache"), IMGCLS_QUIET="0"))
             for n, folder in enumerate(nodes)]
    errs = [err for _, err in _finish(procs, timeout=900)]
    assert all(p.returncode != 0 for p in procs), errs
    assert f"on rank 1 ({socket.gethostname()})" in errs[0] and "not found" in errs[0], errs[0][-2000:]
    assert "not found" in errs[1], errs[1][-2000:]
    assert not (nodes[0] / "run").exists()  # the refused run left no folder behind


@pytest.mark.slow
def test_an_error_before_the_group_exists_stops_the_other_node_too(tmp_path):
    """Node 1 cannot see the --config file (a relative path only node 0's folder holds): its rank fails
    before training joins the process group, so it joins just to pass the error on; node 0's rank stops
    with it instead of waiting for rank 1 until the rendezvous times out."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for folder in nodes:
        folder.mkdir()
    (nodes[0] / "c.yaml").write_text("epochs: 1\n")
    data = make_split_root(tmp_path / "d", train=4, test=1)
    port = free_port()
    procs = [subprocess.Popen(_torchrun(nnodes=2, nproc=1, node_rank=n, port=port) + _train_args(data) + ["--config", "c.yaml"],
                              cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(IMGCLS_CACHE=str(folder / "cache")))
             for n, folder in enumerate(nodes)]
    errs = [err for _, err in _finish(procs, timeout=900)]
    assert all(p.returncode != 0 for p in procs), errs
    assert f"on rank 1 ({socket.gethostname()}): config file not found: c.yaml" in errs[0], errs[0][-2000:]
    assert "config file not found: c.yaml" in errs[1], errs[1][-2000:]
    assert not (nodes[0] / "run").exists()
