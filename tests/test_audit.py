"""imgcls audit and train's cheap audit, on a set with planted problems (tests/planted.py)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

import planted
from conftest import run_cli, tree_digest
from imgcls.config import TrainConfig
from imgcls.data import audit as checks
from imgcls.data import prepare
from imgcls.data.sources import discover


def test_shortcut_scores_leave_one_out():
    # a value held by one image predicts nothing (left out, it has no neighbours): no in-sample 100 %
    s = checks.shortcut_scores(["a", "b", "c", "d"], ["x", "x", "y", "y"])
    assert s["accuracy"] <= 0.5
    # a value shared by a whole class predicts it
    s = checks.shortcut_scores(["png"] * 6 + ["jpg"] * 12, ["p"] * 6 + ["q"] * 6 + ["r"] * 6)
    assert s["per_class"]["p"] == {"recall": 1.0, "precision": 1.0, "count": 6}
    assert s["balanced_accuracy"] == pytest.approx(1 / 3)  # q and r tie on jpg: left out, each loses the vote


def test_exact_duplicates_within_and_across_splits():
    items = [checks.Item("train", "a", "x", "h1", 0), checks.Item("train", "b", "x", "h1", 1),
             checks.Item("train", "c", "x", "h2", 2), checks.Item("test", "d", "y", "h2", 0)]
    dup = checks.exact_duplicates(items)
    assert len(dup["within_split"]) == 1 and len(dup["across_splits"]) == 1 and len(dup["conflicting_labels"]) == 1


def test_near_pairs_need_close_hashes_and_close_colours():
    hashes = np.array([0, 0b111, 2**64 - 1, 0], dtype=np.uint64)
    thumbs = np.zeros((4, 768), np.float32)
    thumbs[3] += 100  # same hash as image 0, other colours
    pairs = checks.near_pairs(hashes, thumbs)
    assert [(i, j, d) for i, j, d, _ in pairs] == [(0, 1, 3)]


def test_train_records_the_cheap_audit(tmp_path):
    p = planted.make(tmp_path / "data")
    data = prepare(TrainConfig(data=str(p.root), img_size=32))
    a = data.report["audit"]
    assert [(f["attribute"], f["class"], f["value"]) for f in a["shortcuts"]] == [("format", "paper", "PNG")]
    assert a["imbalance"]["ratio"] >= 9 and a["imbalance"]["warning"]  # 10:1 before val is carved from train
    assert data.report["imbalance"]["warning"]


@pytest.mark.slow
def test_audit_finds_the_planted_problems_and_never_writes_the_data(tmp_path):
    p = planted.make(tmp_path / "data")
    before = tree_digest(p.root)
    out = tmp_path / "audit"
    r = run_cli("audit", str(p.root), "--out", str(out), "--write-csv")
    assert r.returncode == 0, r.stderr
    assert tree_digest(p.root) == before
    doc = json.loads((out / "audit.json").read_text())
    rel = lambda path: str(path).split(str(p.root) + "/", 1)[1]  # noqa: E731
    found = {frozenset((rel(x["a"]["path"]), rel(x["b"]["path"]))) for x in doc["near_duplicates"]}
    assert {frozenset(pair) for pair in p.near_duplicates} <= found
    assert all(x["across_splits"] for x in doc["near_duplicates"])  # no false pairs among distinct images
    flags = [(f["attribute"], f["class"]) for f in doc["shortcuts"]["flags"]]
    assert ("format", "paper") in flags
    top = [rel(li["path"]) for li in doc["label_issues"][:10]]
    assert len(set(top) & set(p.swapped)) >= 4, top  # most of the 6 swaps in the top 10
    assert doc["balance"]["ratio"] == 10.0 and doc["balance"]["warning"]
    assert doc["balance"]["smallest"][0] == {"class": "rare", "count": 4}
    page = (out / "index.html").read_text()
    assert "data:image/jpeg;base64," in page and "likely label errors" in page
    # the CSV is a data source once placed in the data folder (a copy here, so the data stays untouched)
    copy = tmp_path / "copy"
    shutil.copytree(p.root, copy)
    shutil.copy(out / "audit.csv", copy / "labels.csv")
    disc = discover(str(copy / "labels.csv"))
    assert sorted(disc.pools) == ["test", "train"] and len(disc.pools["train"]) == 124
    with (out / "audit.csv").open() as f:
        rows = list(csv.DictReader(f))
    swapped = [r for r in rows if r["path"] in p.swapped and r["suggested_label"]]
    assert len(swapped) >= 4 and all(r["suggested_label"] != r["label"] for r in swapped)


@pytest.mark.slow
def test_balance_sampler_raises_the_smallest_class_recall(tmp_path):
    from imgcls.engine.evaluate import predict_logits
    from imgcls.engine.inference import load_run
    from imgcls.engine.train import train

    p = planted.make(tmp_path / "data", n_dupes=0, n_swaps=0)
    recall = {}
    for balance in ("none", "sampler"):
        cfg = TrainConfig(data=str(p.root), model="resnet10t", img_size=32, epochs=3, batch_size=16, precision="fp32",
                          augment="flip", lr=3e-3, seed=0, balance=balance)
        _, data = train(cfg, run_dir=tmp_path / balance)
        run = load_run(tmp_path / balance)
        pred = predict_logits(run.model, data.test.images, mean=run.mean, std=run.std, device=run.device, precision="fp32").argmax(1)
        rare = data.classes.index("rare")
        recall[balance] = float((pred[data.test.labels == rare] == rare).float().mean())
    assert recall["sampler"] >= recall["none"] + 0.5, recall
