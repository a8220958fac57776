"""First contact: `imgcls train FOLDER` with no flags, and hints that name the real run folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from conftest import make_split_root, run_cli


def test_no_flags_uses_the_fast_recipe_and_says_so(tmp_path):
    data = make_split_root(tmp_path / "photos", train=8, test=3)
    run = tmp_path / "run"
    r = run_cli("train", str(data), "--out", str(run), env={"IMGCLS_QUIET": "0"})
    assert r.returncode == 0, r.stderr
    assert "recipe fast-finetune: pretrained efficientnet_lite0" in r.stderr
    assert "--model resnet18, or --recipe none" in r.stderr
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["recipe"], cfg["model"], cfg["pretrained"], cfg["freeze"]) == ("fast-finetune", "efficientnet_lite0", True, 4)
    assert cfg["img_size"] == 32  # the data's own size: under the recipe's 160 px ceiling
    assert "test accuracy" in r.stderr
    assert f"next: imgcls eval {run}" in r.stderr


def test_a_named_model_trains_from_scratch(tmp_path):
    data = make_split_root(tmp_path / "photos", train=4, test=2)
    run = tmp_path / "run"
    r = run_cli("train", str(data), "--out", str(run), "--model", "resnet18", "--epochs", "1", "--batch-size", "8",
                env={"IMGCLS_QUIET": "0"})
    assert r.returncode == 0, r.stderr
    assert "recipe fast-finetune" not in r.stderr
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["recipe"], cfg["model"], cfg["pretrained"], cfg["freeze"]) == ("none", "resnet18", False, 0)


def test_recipe_none_without_a_model_keeps_the_plain_defaults():
    from imgcls import config

    cfg = config.resolve(flags={"data": "d", "recipe": "none"}, default_recipe=config.DEFAULT_RECIPE)
    assert (cfg.model, cfg.pretrained, cfg.max_img_size) == ("resnet18", False, 224)
    cfg = config.resolve(flags={"data": "d"}, default_recipe=config.DEFAULT_RECIPE)
    assert (cfg.recipe, cfg.max_img_size) == ("fast-finetune", 160)
    # a model named in a config file counts as stated, like the flag
    assert config.resolve(flags={"data": "d"}, sets=["model=resnet10t"], default_recipe=config.DEFAULT_RECIPE).recipe == "none"


def test_auto_size_stops_at_the_recipe_ceiling(tmp_path):
    from imgcls.data.prepare import auto_img_size
    from imgcls.data.sources import discover

    data = make_split_root(tmp_path / "big", train=2, test=1, size=200)
    disc = discover(str(data))
    assert auto_img_size(disc) == 200
    assert auto_img_size(disc, cap=160) == 160


def test_interrupt_hint_names_the_real_run_folder(tmp_path):
    data = make_split_root(tmp_path / "photos", train=16, test=2)
    run = tmp_path / "my run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgcls", "train", str(data), "--out", str(run), "--model", "resnet18", "--img-size", "32",
         "--batch-size", "4", "--epochs", "200", "--precision", "fp32"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "IMGCLS_QUIET": "0"},
    )
    for line in proc.stderr:  # the summary lines reach stderr as they happen when stderr is not a terminal
        if line.startswith("epoch 1/"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    assert f"imgcls train --resume --out '{run}'" in rest, rest
    assert (run / "checkpoints" / "last.safetensors").is_file()


def test_same_seed_same_machine_same_numbers_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    data = make_split_root(tmp_path / "photos", train=8, test=2)
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:  # the second in a fresh process: nothing the first left in this one changes the numbers
        r = run_cli("train", str(data), "--out", str(run), "--model", "resnet18", "--img-size", "32", "--epochs", "2",
                    "--batch-size", "8", "--seed", "3", process=run == runs[1])
        assert r.returncode == 0, r.stderr
    a, b = (load_file(run / "checkpoints" / "last.safetensors") for run in runs)
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a)
    strip = lambda run: [line.split(",")[:5] for line in (run / "metrics.csv").read_text().splitlines()]  # noqa: E731
    assert strip(runs[0]) == strip(runs[1])  # losses and accuracies; the timing columns differ
    assert json.loads((runs[0] / "eval" / "metrics.json").read_text())["accuracy"] == \
        json.loads((runs[1] / "eval" / "metrics.json").read_text())["accuracy"]
