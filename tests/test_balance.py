"""Class imbalance: the report, the balanced epoch order, loss weights and the selection scores."""

from __future__ import annotations

import torch

from imgcls.config import from_dict
from imgcls.data.balance import balanced_order, class_weights, imbalance
from imgcls.data.prepare import summarize_report
from imgcls.engine.selection import confusion, scores
from imgcls.errors import ImgclsError

import pytest


def test_imbalance_ratio_smallest_and_warning():
    rep = imbalance({"a": 100, "b": 10, "c": 40})
    assert rep["ratio"] == 10.0 and rep["warning"]
    assert [s["class"] for s in rep["smallest"]] == ["b", "c", "a"]
    assert not imbalance({"a": 30, "b": 10})["warning"]  # 3:1 exactly is not above 3:1


def test_summary_prints_counts_ratio_and_warning():
    report = {
        "counts": {"train": {"a": 100, "b": 10}}, "classes": ["a", "b"], "img_size": 32, "excluded_classes": [],
        "skipped": [], "ignored_by_extension": {}, "modes": {"RGB": 110}, "duplicates": [], "conflicting_labels": [],
        "imbalance": imbalance({"a": 100, "b": 10}),
    }
    text = "\n".join(summarize_report(report))
    assert "a 100, b 10; largest/smallest 10.0:1" in text
    assert "warning: classes are imbalanced (10.0:1 > 3:1)" in text


def test_balanced_order_draws_classes_equally_and_is_seeded():
    labels = torch.tensor([0] * 90 + [1] * 9 + [2] * 3)
    order = balanced_order(labels, seed=1, epoch=0)
    assert len(order) == len(labels)
    counts = torch.bincount(labels[order], minlength=3)
    assert counts.tolist() == [34, 34, 34]
    # the small class repeats only after each of its images was drawn: 34 draws of 3 images -> 11 or 12 each
    per_image = torch.bincount(order[labels[order] == 2], minlength=102)[99:]
    assert per_image.min() >= 11 and per_image.max() <= 12
    assert torch.equal(order, balanced_order(labels, seed=1, epoch=0))
    assert not torch.equal(order, balanced_order(labels, seed=1, epoch=1))


def test_class_weights_inverse_for_small_counts_and_mean_one():
    counts = [100, 10]
    w = class_weights(counts)
    assert float((w * torch.tensor(counts, dtype=torch.float32)).sum()) == pytest.approx(sum(counts), rel=1e-5)
    assert float(w[1] / w[0]) == pytest.approx(9.6, rel=0.05)  # near inverse frequency (10) at these counts
    exact = class_weights(counts, beta=1.0)
    assert float(exact[1] / exact[0]) == pytest.approx(10.0)
    # thousands: the effective number flattens the ratio well below inverse frequency
    big = class_weights([10_000, 100])
    assert float(big[1] / big[0]) < 20


def test_selection_scores_from_confusion():
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    pred = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    s = scores(confusion(pred, labels, 3))  # class 2 absent: left out of the class averages
    assert s["accuracy"] == pytest.approx(0.9)
    assert s["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    f1_0 = 2 * (8 / 9) * 1.0 / (8 / 9 + 1.0)
    f1_1 = 2 * 1.0 * 0.5 / 1.5
    assert s["macro_f1"] == pytest.approx((f1_0 + f1_1) / 2)


def test_config_keys_are_checked():
    cfg = from_dict({"balance": "sampler", "select": "macro_f1", "resize": "pad"})
    assert (cfg.balance, cfg.select, cfg.resize) == ("sampler", "macro_f1", "pad")
    for key in ("balance", "select", "resize"):
        with pytest.raises(ImgclsError, match=key):
            from_dict({key: "bogus"})


def test_select_macro_f1_is_recorded_per_epoch(split_root, tmp_path):
    from imgcls.config import TrainConfig
    from imgcls.engine.reporter import read_history
    from imgcls.engine.train import train

    cfg = TrainConfig(data=str(split_root), model="resnet10t", img_size=32, epochs=2, batch_size=8, precision="fp32",
                      augment="flip", balance="weights", select="macro_f1", tensorboard=False)
    result, _ = train(cfg, run_dir=tmp_path / "run")
    history = read_history(tmp_path / "run" / "metrics.csv")
    assert {"val_macro_f1", "val_balanced_accuracy"} <= set(history[0])
    best = max(history, key=lambda h: (h["val_macro_f1"], -h["epoch"]))
    assert result.best_epoch == best["epoch"] and result.best_val_acc == pytest.approx(best["val_macro_f1"], abs=1e-5)
