"""Hostile or careless use: many classes, concurrent runs, damaged caches, edited checkpoints, foreign
weights, outputs in the wrong place, symlinks and loops, out-of-range config, YAML bombs, odd formats.

Each test reproduces a failure first seen on a tiny run; all use tiny images and take seconds.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import class_image, make_split_root, run_cli, write_class_folders
from imgcls import config as config_mod
from imgcls.engine import checkpoint as ckpt
from imgcls.errors import ImgclsError

FAST = ["--model", "resnet18", "--img-size", "16", "--batch-size", "8", "--precision", "fp32", "--epochs", "1"]


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    for n in needles:
        assert n in r.stderr, r.stderr
    return r.stderr


# -- 1. hundreds of classes -----------------------------------------------------------------------------


def test_confusion_matrix_figure_stays_small_for_many_classes(tmp_path):
    from imgcls.report import plots

    n = 120  # 0.55 in per class made this 7,500 px square (300 classes: > 8 GB while drawing)
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 3, (n, n))
    cm[np.arange(n), np.arange(n)] += 5
    cm[7, 93] = 40  # the most confused pair must be in the drawn subset
    classes = [f"class_{i:03d}" for i in range(n)]
    for normalize in (False, True):
        path = plots.confusion_matrix(cm.tolist(), classes, tmp_path / f"cm{normalize}.png", normalize=normalize)
        with Image.open(path) as im:
            assert max(im.size) <= 2400, im.size
    shown = plots.confusion_subset(np.asarray(cm), limit=50)
    assert len(shown) == 50 and 7 in shown and 93 in shown
    assert list(plots.confusion_subset(np.eye(6), limit=50)) == list(range(6))


@pytest.mark.slow  # ~30 s alone on 2 cores, 2 min when they are shared
def test_300_classes_train_and_evaluate_in_under_2_gb(tmp_path):
    classes = [f"c{i:03d}" for i in range(300)]
    data = tmp_path / "many"
    # 3 images per class to learn from (2 train, 1 val) and 1 to test on
    for split, per in (("train", 2), ("val", 1), ("test", 1)):
        write_class_folders(data / split, classes, per, size=16, offset={"train": 0, "val": 10, "test": 20}[split])
    run = tmp_path / "run"
    probe = (
        "import resource, subprocess, sys;"
        "r = subprocess.run([sys.executable, '-m', 'imgcls', *sys.argv[1:]]);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe, "train", str(data), "--out", str(run), *FAST, "--batch-size", "64"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    peak_kib = int(r.stdout.strip().splitlines()[-1])
    print(f"300 classes: peak RSS {peak_kib / 1024:.0f} MiB")  # the figure, with pytest -s
    assert peak_kib < 2 * 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
    summary = json.loads((run / "summary.json").read_text())
    assert "test_accuracy" in summary
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert len(m["per_class"]) == 300
    assert (run / "eval" / "confusion_matrix.png").is_file()


# -- 2. one run folder, one writer ----------------------------------------------------------------------


def test_second_run_into_a_busy_run_folder_is_refused(tmp_path):
    data = make_split_root(tmp_path / "data", train=6, test=2, size=16)
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "imgcls", "train", str(data), "--out", str(run), *FAST, "--epochs", "5000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "config.json").is_file():  # the first run is now past its start
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "first run never started"
            time.sleep(0.2)
        r = run_cli("train", str(data), "--out", str(run), *FAST, "--seed", "7")
        _one_line_error(r, "in use", f"pid {first.pid} on {socket.gethostname()}")
        assert json.loads((run / "config.json").read_text())["seed"] == 0  # untouched by the refused run
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)


def test_stale_run_lock_is_taken_over(tmp_path):
    from imgcls.locks import exclusive

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".imgcls.lock").write_text("999999999\n")  # a pid that cannot be alive; nobody holds the lock
    with exclusive(folder, what="run folder"):
        assert (folder / ".imgcls.lock").read_text().split() == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(ImgclsError, match="in use"):
            with exclusive(folder, what="run folder"):  # a second holder, even in this process
                pass
    assert not (folder / ".imgcls.lock").exists()


# -- 3. the decode cache under concurrency and damage ----------------------------------------------------


def _fill(cache: str, roots: list[str], barrier, errors) -> None:
    os.environ["IMGCLS_CACHE"] = cache
    from imgcls.data.cache import decode_pool
    from imgcls.data.sources import Pool

    barrier.wait()
    for root in roots:
        files = sorted(str(p) for p in Path(root).iterdir())
        try:
            dec = decode_pool(Pool("all", files, ["a"] * len(files)), size=8, workers=1)
            assert dec.images.shape == (len(files), 8, 8, 3)
        except BaseException as e:  # noqa: BLE001 - the test counts every kind of failure
            errors.put(f"{type(e).__name__}: {e}")


def test_four_processes_fill_fresh_cache_entries_at_once(tmp_path):
    roots = []
    for i in range(150):
        d = tmp_path / "sets" / f"s{i}"
        d.mkdir(parents=True)
        class_image(i % 6, i, 8).save(d / "a.png")
        roots.append(str(d))
    ctx = mp.get_context("spawn")
    barrier, errors = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_fill, args=(str(tmp_path / "cache"), roots, barrier, errors)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, f"{len(found)} failures, e.g. {found[:3]}"
    assert all(p.exitcode == 0 for p in procs)
    assert not list((tmp_path / "cache").rglob("*.tmp*"))


@pytest.mark.parametrize("damage", ["truncate-images", "empty-meta", "flip-pixel"])
def test_damaged_cache_entry_is_rebuilt_with_a_warning(tmp_path, monkeypatch, capsys, damage):
    from imgcls.data.cache import cache_root, decode_pool
    from imgcls.data.sources import Pool

    write_class_folders(tmp_path / "d", ["a", "b"], 4, size=16)
    files = sorted(str(p) for p in (tmp_path / "d").rglob("*.png"))
    pool = Pool("all", files, [Path(f).parent.name for f in files])
    first = np.array(decode_pool(pool, size=16).images)
    (entry,) = (cache_root() / "entries").iterdir()
    if damage == "truncate-images":
        p = entry / "images.npy"
        p.write_bytes(p.read_bytes()[:-100])
    elif damage == "empty-meta":
        (entry / "meta.json").write_text("")
    else:
        p = entry / "images.npy"
        b = bytearray(p.read_bytes())
        b[-1] ^= 0xFF
        p.write_bytes(bytes(b))
    monkeypatch.setenv("IMGCLS_QUIET", "0")
    again = decode_pool(pool, size=16)
    assert np.array_equal(np.array(again.images), first)
    assert "damaged" in capsys.readouterr().err
    monkeypatch.setenv("IMGCLS_QUIET", "1")
    assert np.array_equal(np.array(decode_pool(pool, size=16).images), first)  # the rebuilt entry holds


# -- 4. checkpoint metadata ------------------------------------------------------------------------------


def _edit_header(path: Path, edit) -> None:
    """Rewrite the safetensors JSON header in place (what a hand edit of the file does)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["meta"])
    edit(meta)
    header["__metadata__"]["meta"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _run_meta(**changes) -> dict:
    meta = {
        "config": config_mod.to_dict(config_mod.TrainConfig(data="d", img_size=16)),
        "classes": ["cat", "dog"],
        "excluded_classes": [],
        "img_size": 16,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "precision": "fp32",
        "channels_last": False,
        "kind": "weights",
    }
    for k, v in changes.items():
        if v is ...:
            meta.pop(k)
        else:
            meta[k] = v
    return meta


def test_edited_checkpoint_metadata_fails_the_integrity_check(tmp_path):
    path = tmp_path / "c.safetensors"
    ckpt.save(path, {"model.w": torch.zeros(4)}, _run_meta())
    _edit_header(path, lambda m: m.update(classes=["dog", "cat"]))  # swapping names would flip every label
    with pytest.raises(ImgclsError, match="integrity"):
        ckpt.load(path)


@pytest.mark.parametrize(
    "meta, message",
    [
        (None, "metadata"),
        (_run_meta(config=...), "config"),
        (_run_meta(config={"model": "resnet18", "colour": "red"}), "colour"),
        (_run_meta(classes="cat,dog"), "classes"),
        (_run_meta(classes=["cat", 3]), "classes"),
        (_run_meta(classes=["cat", "cat"]), "classes"),
        (_run_meta(std=[0.2, 0.0, 0.2]), "std"),
        (_run_meta(mean=[0.5, float("nan"), 0.5]), "mean"),
        (_run_meta(img_size="16"), "img_size"),
        (_run_meta(img_size=100000), "img_size"),
        (_run_meta(excluded_classes=None), "excluded_classes"),
    ],
)
def test_checkpoint_metadata_is_validated(tmp_path, meta, message):
    path = tmp_path / "c.safetensors"
    ckpt.save(path, {"model.w": torch.zeros(4)}, meta)
    with pytest.raises(ImgclsError, match=message) as e:
        ckpt.load_run_meta(path)
    assert "\n" not in str(e.value) and len(str(e.value)) < 800


def test_checkpoint_with_bad_metadata_is_a_one_line_cli_error(tmp_path):
    run = tmp_path / "run"
    ckpt.save(run / "checkpoints" / "best.safetensors", {"model.w": torch.zeros(4)}, _run_meta(std=[0, 0, 0]))
    write_class_folders(tmp_path / "imgs", ["x"], 1, size=16)
    _one_line_error(run_cli("predict", str(run), str(tmp_path / "imgs")), "std")


# -- 5. weights from another architecture ----------------------------------------------------------------


def _save_state(model, path: Path, drop: tuple[str, ...] = ()) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(drop)}, path)
    return path


def test_weights_of_another_architecture_are_refused(tmp_path, capsys, monkeypatch):
    from imgcls.models import build_model

    r50 = _save_state(build_model("resnet50", num_classes=5), tmp_path / "r50.safetensors")
    with pytest.raises(ImgclsError, match="90 %") as e:
        build_model("resnet18", num_classes=3, weights=str(r50))
    assert "--weights-partial" in str(e.value)
    part = _save_state(build_model("resnet18", num_classes=5), tmp_path / "part.safetensors", drop=("layer3.", "layer4."))
    with pytest.raises(ImgclsError, match="90 %"):
        build_model("resnet18", num_classes=3, weights=str(part))
    monkeypatch.setenv("IMGCLS_QUIET", "0")
    m = build_model("resnet18", num_classes=3, weights=str(part), weights_partial=True)
    err = capsys.readouterr().err
    assert "missing" in err and "layer3" in err
    full = build_model("resnet18", num_classes=5)
    _save_state(full, tmp_path / "full.safetensors")
    m = build_model("resnet18", num_classes=3, weights=str(tmp_path / "full.safetensors"))
    assert torch.equal(m.layer4[0].conv1.weight, full.layer4[0].conv1.weight)
    assert "loaded" in capsys.readouterr().err
    assert config_mod.from_dict({"weights_partial": "yes"}).weights_partial is True


# -- 6. outputs land where they should --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    data = make_split_root(root / "data", train=4, test=2, size=16)
    run = root / "run"
    r = run_cli("train", str(data), "--out", str(run), *FAST, env={"IMGCLS_CACHE": str(root / "cache")})
    assert r.returncode == 0, r.stderr
    return data, run


def test_predict_out_must_be_a_csv_or_json_outside_the_inputs(tiny_run, tmp_path):
    data, run = tiny_run
    imgs = data / "test" / "cat"
    before = sorted(p.name for p in imgs.iterdir())
    _one_line_error(run_cli("predict", str(run), str(imgs), "--out", str(tmp_path / "p.png")), ".csv or .json")
    _one_line_error(run_cli("predict", str(run), str(imgs), "--out", str(imgs / "p.csv")), "inside")
    _one_line_error(run_cli("predict", str(run), str(data / "test" / "*" / "*.png"), "--out", str(imgs / "p.csv")), "inside")
    (tmp_path / "folder.csv").mkdir()
    _one_line_error(run_cli("predict", str(run), str(imgs), "--out", str(tmp_path / "folder.csv")), "folder")
    assert sorted(p.name for p in imgs.iterdir()) == before
    r = run_cli("predict", str(run), str(imgs), "--out", str(tmp_path / "ok.csv"))
    assert r.returncode == 0, r.stderr


def test_train_out_inside_the_data_is_refused(tmp_path):
    data = make_split_root(tmp_path / "data", train=4, test=2, size=16)
    _one_line_error(run_cli("train", str(data), "--out", str(data), *FAST), "inside the data")
    _one_line_error(run_cli("train", str(data), "--out", str(data / "runs" / "x"), *FAST), "inside the data")
    # a relative PYTHONPATH (src) would not survive the change of folder
    abs_path = os.pathsep.join(str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    _one_line_error(run_cli("train", ".", *FAST, cwd=data, env={"PYTHONPATH": abs_path}), "inside the data")
    assert not (data / "runs").exists() and not (data / "checkpoints").exists()


def test_run_folders_are_never_scanned_as_classes(tiny_run, tmp_path):
    import shutil

    from imgcls.data.sources import discover

    data, run = tiny_run
    flat = tmp_path / "flat"
    write_class_folders(flat, ["cat", "dog"], 3, size=16)
    shutil.copytree(run, flat / "oldrun")  # a run folder copied (or written, before) into the data
    shutil.copytree(run, flat / "runs" / "data-resnet18")  # the default runs/ folder of `cd D && imgcls train .`
    disc = discover(str(flat))
    assert sorted(set(disc.pools["all"].labels)) == ["cat", "dog"]
    assert {Path(s["path"]).name for s in disc.skipped} == {"oldrun", "data-resnet18"}


# -- 7. symlinks and loops --------------------------------------------------------------------------------


def test_symlinks_out_of_the_data_root_are_skipped_and_reported(tmp_path):
    from imgcls.data.sources import discover

    outside = write_class_folders(tmp_path / "outside", ["secret"], 2, size=16)
    data = write_class_folders(tmp_path / "data", ["cat", "dog"], 3, size=16)
    (data / "cat" / "leak.png").symlink_to(outside / "secret" / "secret_0.png")
    (data / "secret").symlink_to(outside / "secret", target_is_directory=True)
    (data / "dog" / "inside.png").symlink_to(data / "cat" / "cat_0.png")  # inside the root: fine
    disc = discover(str(data))
    pool = disc.pools["all"]
    assert sorted(set(pool.labels)) == ["cat", "dog"]
    assert not any("secret" in p or p.endswith("leak.png") for p in pool.paths)
    assert any(p.endswith("inside.png") for p in pool.paths)
    skipped = {Path(s["path"]).name: s["reason"] for s in disc.skipped}
    assert set(skipped) == {"leak.png", "secret"} and all("outside" in r for r in skipped.values())
    # the CSV source follows the same policy
    (data / "labels.csv").write_text("path,label\ncat/leak.png,cat\ncat/cat_0.png,cat\ndog/dog_0.png,dog\n")
    disc = discover(str(data / "labels.csv"))
    assert len(disc.pools["all"]) == 2 and [Path(s["path"]).name for s in disc.skipped] == ["leak.png"]


def test_globs_are_deduplicated_and_never_follow_a_directory_loop(tmp_path):
    from imgcls.engine.inference import expand_paths

    d = write_class_folders(tmp_path / "d", ["a", "b"], 4, size=8)
    (d / "a" / "loop").symlink_to(d, target_is_directory=True)
    (d / "b" / "again.png").symlink_to(d / "a" / "a_0.png")
    got = expand_paths([str(d / "**" / "*.png"), str(d), str(d / "a" / "a_0.png")])
    assert len(got) == 8, got
    assert len({p.resolve() for p in got}) == 8


# -- 8. config ranges, YAML bombs, unsupported formats -----------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seed", "100000000000000000000"], "seed"),
        (["--seed", "1e20"], "seed"),
        (["--lr", "-0.1"], "lr"),
        (["--lr", "nan"], "lr"),
        (["--epochs", "0"], "epochs"),
        (["--weight-decay", "-1"], "weight_decay"),
        (["--img-size", "100000"], "img_size"),
        (["--batch-size", "10000000"], "batch_size"),
    ],
)
def test_out_of_range_config_is_refused_before_anything_is_written(tmp_path, flags, message):
    data = make_split_root(tmp_path / "data", train=3, test=1, size=16)
    run = tmp_path / "run"
    _one_line_error(run_cli("train", str(data), "--out", str(run), *FAST, *flags), message)
    assert not run.exists()


BOMB = """a: &a ["x","x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]
"""


def test_yaml_alias_bomb_is_refused_with_a_short_error(tmp_path):
    assert len(BOMB) < 400
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    with pytest.raises(ImgclsError, match="alias") as e:
        config_mod.read_yaml(bomb, what="config file")
    assert len(str(e.value)) < 300
    data = make_split_root(tmp_path / "data", train=3, test=1, size=16)
    _one_line_error(run_cli("train", str(data), "--config", str(bomb), "--out", str(tmp_path / "r")), "alias")
    _one_line_error(run_cli("study", str(bomb), "--out", str(tmp_path / "s")), "alias")
    # ordinary anchors still work
    ok = tmp_path / "ok.yaml"
    ok.write_text("base: &b {lr: 0.01}\nother: *b\n")
    assert config_mod.read_yaml(ok, what="x")["other"] == {"lr": 0.01}


def test_unsupported_formats_are_listed_as_skipped_rows(tiny_run, tmp_path):
    data, run = tiny_run
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    class_image(0, 0, 16).save(imgs / "ok.png")
    (imgs / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    (imgs / "notes.txt").write_text("not an image")
    r = run_cli("predict", str(run), str(imgs), "--out", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "p.json").read_text())
    assert [Path(p["path"]).name for p in doc["predictions"]] == ["ok.png"]
    assert [(Path(s["path"]).name, "unsupported" in s["reason"]) for s in doc["skipped"]] == [("phone.heic", True)]
