"""``imgcls audit``: registered by ``imgcls.cli``."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("audit", help="near-duplicates, likely label errors, shortcuts and class balance of DATA (never modifies it)")
    p.add_argument("data", help="a folder, a CSV of path,label[,split], or fashion-mnist")
    p.add_argument("--out", type=Path, default=None, help="output folder (default audit-<data folder name>)")
    p.add_argument("--write-csv", action="store_true", help="also write audit.csv: path,label,[split,]issue,suggested_label")
    p.add_argument("--img-size", type=int, default=0, help="decode size (0 = the data's most common size, at most 160)")
    p.add_argument("--folds", type=int, default=5, help="folds of the out-of-sample label check")
    p.add_argument("--no-labels", dest="labels", action="store_false", help="skip the label check (no features)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (for the feature extractor)")
    p.set_defaults(handler=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from imgcls import progress
    from imgcls.audit.core import run_audit
    from imgcls.errors import ImgclsError

    if args.folds < 2:
        raise ImgclsError("--folds must be at least 2")
    out = args.out or Path(f"audit-{Path(args.data).resolve().name or 'data'}")
    doc = run_audit(args.data, out, img_size=args.img_size, folds=args.folds, write_csv=args.write_csv,
                    labels=args.labels, device=args.device)
    nd = doc["near_duplicate_summary"]
    ex = doc["exact_duplicates"]
    bal = doc["balance"]
    progress.say(f"audited {doc['images']:,} images in {doc['seconds']['total_s']:.0f} s")
    progress.say(f"  near-duplicates: {nd['pairs']} pair(s), {nd['across_splits']} across splits, {nd['labels_differ']} with different labels")
    progress.say(f"  exact duplicates: {len(ex['within_split'])} group(s) within a split, {len(ex['across_splits'])} across splits")
    if args.labels:
        progress.say(f"  likely label errors: {len(doc['label_issues'])}" + (f" ({doc['label_issue_note']})" if doc["label_issue_note"] else ""))
    for f in doc["shortcuts"]["flags"]:
        progress.say(f"  possible shortcut: {f['attribute']} {f['value']!r} marks {f['class']} (precision {f['precision']:.0%}, recall {f['recall']:.0%})")
    progress.say(f"  classes: largest/smallest {bal['ratio']:.1f}:1" + (" (imbalanced: consider --balance sampler)" if bal["warning"] else ""))
    files = "audit.json, index.html" + (", audit.csv (paths relative to the data: place it in the data folder to train on it)" if args.write_csv else "")
    progress.say(f"files: {out}/ {files}")
    return 0
