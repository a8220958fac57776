"""From a config to ready splits (uint8 image rows over the decode cache), a fixed class map and the data report."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imgcls.config import TrainConfig
from imgcls.data import audit as audit_checks
from imgcls.data.balance import imbalance
from imgcls.data.cache import DecodedPool, decode_pool, peek_sizes
from imgcls.data.rows import ImageRows
from imgcls.data.sources import Discovery, discover, source_files, stratified_split
from imgcls.errors import ImgclsError


@dataclass
class Split:
    """One split: ``images`` are ``N x S x S x 3`` uint8 rows, read a batch at a time (from the decode cache's
    file, so a split costs no memory for its pixels), ``labels`` index the class map."""

    name: str
    images: ImageRows
    labels: torch.Tensor
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class PreparedData:
    classes: list[str]
    img_size: int
    train: Split
    val: Split
    test: Split | None
    excluded_classes: list[str] = field(default_factory=list)
    excluded_test: Split | None = None  # test images of left-out classes; labels index excluded_classes
    report: dict = field(default_factory=dict)


def auto_img_size(disc: Discovery, *, cap: int = 224) -> int:
    """The most common longer side among the first images, at most ``cap`` (a cheap header read)."""
    pool = next(iter(disc.pools.values()))
    sizes = peek_sizes(pool)
    if not sizes:
        return cap
    (w, h), _ = sizes.most_common(1)[0]
    return int(min(max(w, h), cap))


def _decode_all(disc: Discovery, size: int, max_bad: float, resize: str = "squash") -> dict[str, DecodedPool]:
    src_id = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in source_files(disc))
    out = {}
    for name, pool in disc.pools.items():
        dec = decode_pool(pool, size=size, resize=resize, source_id=src_id)
        bad = len(dec.skipped)
        if len(pool) and bad / len(pool) > max_bad:
            examples = "; ".join(f"{Path(s['path']).name}: {s['reason']}" for s in dec.skipped[:3])
            where = "in the data" if name == "all" else f"in the {name} split"
            raise ImgclsError(
                f"{bad} of {len(pool)} files {where} cannot be used ({bad / len(pool):.0%} > "
                f"max_bad_fraction {max_bad:.0%}), e.g. {examples}. Fix the files or raise --max-bad-fraction."
            )
        out[name] = dec
    return out


def _rows_split(name: str, dec: DecodedPool, rows: np.ndarray, label_ids: list[int]) -> Split:
    """The split's rows of the pool's cache entry: nothing is read (or copied) here."""
    return Split(name, dec.select(rows), torch.as_tensor(label_ids, dtype=torch.int64), [dec.paths[i] for i in rows])


def _assign(disc: Discovery, pools: dict[str, DecodedPool], cfg: TrainConfig) -> dict[str, tuple[str, np.ndarray]]:
    """split name -> (pool name, row indices into that pool)."""
    out: dict[str, tuple[str, np.ndarray]] = {}
    if "all" in pools:
        parts = stratified_split(
            pools["all"].labels, {"val": cfg.val_fraction, "test": cfg.test_fraction}, seed=cfg.split_seed
        )
        return {k: ("all", v) for k, v in parts.items()}
    if "train" not in pools:
        raise ImgclsError(f"{disc.root} has no training split (expected a train/ folder or split=train rows)")
    carve = {}
    if "val" not in pools:
        carve["val"] = cfg.val_fraction
    if "test" not in pools:
        carve["test"] = cfg.test_fraction
    parts = stratified_split(pools["train"].labels, carve, seed=cfg.split_seed)
    for k, v in parts.items():
        out[k] = ("train", v)
    for k in ("val", "test"):
        if k in pools:
            out[k] = (k, np.arange(len(pools[k].paths)))
    return out


def prepare(cfg: TrainConfig) -> PreparedData:
    """Discover, verify and decode ``cfg.data``; fix the class map from the training split."""
    disc = discover(cfg.data)
    size = cfg.img_size or auto_img_size(disc, cap=cfg.max_img_size)
    pools = _decode_all(disc, size, cfg.max_bad_fraction, cfg.resize)
    assignment = _assign(disc, pools, cfg)

    train_pool, train_rows = assignment["train"]
    train_labels = [pools[train_pool].labels[i] for i in train_rows]
    all_classes = sorted(set(train_labels))
    unknown_excl = [c for c in cfg.exclude_classes if c not in all_classes]
    if unknown_excl:
        raise ImgclsError(
            f"exclude_classes names unknown class(es) {', '.join(unknown_excl)}; classes are {', '.join(all_classes)}"
        )
    excluded = [c for c in all_classes if c in cfg.exclude_classes]
    classes = [c for c in all_classes if c not in excluded]
    if len(classes) < 2:
        raise ImgclsError(
            f"training needs at least two classes; found {len(classes)} ({', '.join(classes) or 'none'})"
            + (f" after excluding {', '.join(excluded)}" if excluded else "")
        )
    index = {c: i for i, c in enumerate(classes)}

    splits: dict[str, Split] = {}
    excluded_test = None
    for name in ("train", "val", "test"):
        pool_name, rows = assignment[name]
        dec = pools[pool_name]
        names = [dec.labels[i] for i in rows]
        unseen = sorted({n for n in names if n not in index and n not in excluded})
        if unseen:
            raise ImgclsError(
                f"class(es) {', '.join(unseen)} appear in the {name} split but not in training; "
                f"the model knows {', '.join(classes)}"
            )
        keep = np.asarray([i for i, n in zip(rows, names) if n in index], dtype=np.int64)
        splits[name] = _rows_split(name, dec, keep, [index[dec.labels[i]] for i in keep])
        if name == "test" and excluded:
            ex_rows = np.asarray([i for i, n in zip(rows, names) if n in excluded], dtype=np.int64)
            ex_index = {c: i for i, c in enumerate(excluded)}
            excluded_test = _rows_split("test-excluded", dec, ex_rows, [ex_index[dec.labels[i]] for i in ex_rows])
    if len(splits["val"]) == 0:
        raise ImgclsError("the validation split is empty: raise --val-fraction or add images")

    report = build_report(disc, pools, assignment, classes=classes, excluded=excluded, size=size)
    items = [
        audit_checks.Item(split, pools[pool_name].paths[i], pools[pool_name].labels[i], pools[pool_name].hashes[i], int(i))
        for split, (pool_name, rows) in assignment.items() for i in rows
    ]
    report["audit"] = audit_checks.cheap(items, disc.root, read_facts=disc.kind != "fashion-mnist")
    return PreparedData(
        classes=classes,
        img_size=size,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"] if len(splits["test"]) else None,
        excluded_classes=excluded,
        excluded_test=excluded_test,
        report=report,
    )


def prepare_eval(
    data: str, *, classes: list[str], img_size: int, allow_unknown: list[str] = (), resize: str = "squash",
    max_bad: float = TrainConfig.max_bad_fraction,
) -> tuple[Split, Split | None, dict]:
    """Evaluation data mapped onto a model's class map by name.

    A split root is evaluated on its test split; a folder of classes (or a CSV) whole. Images of classes in
    ``allow_unknown`` (a run's left-out classes) are returned apart; any other unknown class is an error.
    More than ``max_bad`` unreadable files is the same error as in training: a score on the few images that
    could be read would pass for a score on the data.
    """
    disc = discover(data)
    if "test" in disc.pools:
        pools_used = {"test": disc.pools["test"]}
    elif "all" in disc.pools:
        pools_used = {"all": disc.pools["all"]}
    else:
        raise ImgclsError(f"{data} has no test split to evaluate (expected test/ or a plain folder of classes)")
    disc = Discovery(disc.kind, disc.root, pools_used, disc.ignored_by_extension, skipped=disc.skipped)
    pools = _decode_all(disc, img_size, max_bad, resize=resize)
    name, dec = next(iter(pools.items()))
    index = {c: i for i, c in enumerate(classes)}
    unseen = sorted({n for n in dec.labels if n not in index and n not in allow_unknown})
    if unseen:
        raise ImgclsError(
            f"class(es) {', '.join(unseen)} in {data} are unknown to the model, which knows {', '.join(classes)}"
        )
    known = np.asarray([i for i, n in enumerate(dec.labels) if n in index], dtype=np.int64)
    split = _rows_split(name, dec, known, [index[dec.labels[i]] for i in known])
    extra = None
    allowed = list(allow_unknown)
    other = np.asarray([i for i, n in enumerate(dec.labels) if n not in index], dtype=np.int64)
    if len(other):
        extra = _rows_split("excluded", dec, other, [allowed.index(dec.labels[i]) for i in other])
    report = build_report(disc, pools, {"eval": (name, np.arange(len(dec.paths)))}, classes=classes, excluded=allowed, size=img_size)
    return split, extra, report


def build_report(
    disc: Discovery,
    pools: dict[str, DecodedPool],
    assignment: dict[str, tuple[str, np.ndarray]],
    *,
    classes: list[str],
    excluded: list[str],
    size: int,
) -> dict:
    """The ``data_report.json`` content: counts, skips, modes, sizes, ignored files, duplicates."""
    counts: dict[str, dict[str, int]] = {}
    where: dict[str, list[tuple[str, str, str]]] = defaultdict(list)  # hash -> [(split, path, label)]
    for split, (pool_name, rows) in assignment.items():
        dec = pools[pool_name]
        counts[split] = dict(sorted(Counter(dec.labels[i] for i in rows).items()))
        for i in rows:
            where[dec.hashes[i]].append((split, dec.paths[i], dec.labels[i]))
    duplicates = []
    conflicts = []
    for h, hits in where.items():
        if len(hits) < 2:
            continue
        if len({s for s, _, _ in hits}) > 1:
            duplicates.append({"hash": h, "files": [{"split": s, "path": p, "label": lab} for s, p, lab in hits]})
        if len({lab for _, _, lab in hits}) > 1:
            conflicts.append({"hash": h, "files": [{"split": s, "path": p, "label": lab} for s, p, lab in hits]})
    learned = counts.get("train") or next(iter(counts.values()), {})  # eval data: the evaluated split
    modes: Counter = Counter()
    sizes: Counter = Counter()
    skipped = list(disc.skipped)  # links out of the data root, run folders: refused before decoding
    for dec in pools.values():
        modes.update(dec.modes)
        sizes.update(dec.sizes)
        skipped.extend(dec.skipped)
    return {
        "source": {"kind": disc.kind, "root": disc.root},
        "img_size": size,
        "classes": classes,
        "excluded_classes": excluded,
        "counts": counts,
        "skipped": skipped,
        "modes": dict(modes),
        "sizes": dict(sizes.most_common(10)),
        "ignored_by_extension": disc.ignored_by_extension,
        "duplicates": duplicates,
        "conflicting_labels": conflicts,
        "imbalance": imbalance({c: n for c, n in learned.items() if c in classes}),
    }


def summarize_report(report: dict) -> list[str]:
    """A few lines for the terminal."""
    lines = []
    counts = report["counts"]
    lines.append(
        "data: "
        + ", ".join(f"{split} {sum(c.values()):,}" for split, c in counts.items())
        + f" images, {len(report['classes'])} classes, {report['img_size']}px"
    )
    if report["excluded_classes"]:
        lines.append(f"  left out: {', '.join(report['excluded_classes'])}")
    if report["skipped"]:
        reasons = Counter(s["reason"].split(":")[0] for s in report["skipped"])
        lines.append(
            f"  skipped {len(report['skipped'])} unusable file(s): "
            + ", ".join(f"{n} {r}" for r, n in reasons.most_common(4))
        )
    if report["ignored_by_extension"]:
        n = sum(report["ignored_by_extension"].values())
        lines.append(f"  ignored {n} non-image file(s) by extension: " + ", ".join(sorted(report["ignored_by_extension"])))
    odd = {m: n for m, n in report["modes"].items() if m != "RGB"}
    if odd:
        lines.append("  converted to RGB: " + ", ".join(f"{n} {m}" for m, n in sorted(odd.items())))
    imb = report.get("imbalance")
    if imb and imb["counts"]:
        shown = sorted(imb["counts"].items(), key=lambda kv: -kv[1])
        more = f", ... ({len(shown) - 12} more)" if len(shown) > 12 else ""
        lines.append(
            "  classes: " + ", ".join(f"{c} {n:,}" for c, n in shown[:12]) + more + f"; largest/smallest {imb['ratio']:.1f}:1"
        )
        if imb["warning"]:
            lines.append(
                f"  warning: classes are imbalanced ({imb['ratio']:.1f}:1 > 3:1); consider --balance sampler (or weights) "
                "and --select macro_f1"
            )
    if "audit" in report:
        lines.extend(audit_checks.summarize(report["audit"]))
    if report["duplicates"]:
        lines.append(f"  warning: {len(report['duplicates'])} image(s) appear in more than one split (see data_report.json)")
    if report["conflicting_labels"]:
        lines.append(f"  warning: {len(report['conflicting_labels'])} identical image(s) carry different labels")
    return lines
