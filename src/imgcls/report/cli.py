"""``imgcls compare`` and ``imgcls report``: registered by ``imgcls.cli``."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parsers(sub) -> None:
    c = sub.add_parser(
        "compare", help="two runs on the same test images: accuracies with intervals, the paired difference, McNemar's test",
        description="Both runs predict the same test images: their shared test split (same data and split settings), "
                    "or DATA. Writes OUT/compare.json, grids of the images only one run gets right, and OUT/report.html.",
    )
    c.add_argument("run_a", type=Path, metavar="RUN_A", help="a run folder")
    c.add_argument("run_b", type=Path, metavar="RUN_B", help="another run folder, compared on the same test images")
    c.add_argument("data", nargs="?", default=None, metavar="DATA", help="test images for both runs (default: their shared test split)")
    c.add_argument("--out", type=Path, default=None, help="folder for compare.json and the page (default runs/compare-A-vs-B)")
    c.add_argument("--classes", default="same", choices=("same", "shared"),
                   help="same: the runs must know the same classes (default); shared: compare on the classes both know")
    c.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    c.add_argument("--max-bad-fraction", default=None, metavar="MAX_BAD_FRACTION",
                   help="largest share of unreadable files in DATA before compare stops with an error (default: each run's)")
    c.set_defaults(handler=cmd_compare)

    r = sub.add_parser("report", help="one self-contained HTML page for a run, a study or a comparison folder")
    r.add_argument("folder", type=Path, metavar="RUN|STUDY|COMPARE_DIR", help="a run, study or compare folder")
    r.add_argument("--out", type=Path, default=None, help="the page to write (default FOLDER/report.html)")
    r.set_defaults(handler=cmd_report)


def cmd_compare(args: argparse.Namespace) -> int:
    from imgcls import progress
    from imgcls.compare import compare_runs

    out = args.out or Path("runs") / f"compare-{args.run_a.name}-vs-{args.run_b.name}"
    doc = compare_runs(args.run_a, args.run_b, args.data, out, classes=args.classes, device=args.device,
                       max_bad_fraction=args.max_bad_fraction)
    print(doc["sentence"])
    grids = [name for name in doc["grids"].values() if name]  # a grid with no image is not written
    progress.say(f"files: {out}/compare.json, report.html" + "".join(f", {g}" for g in grids))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from imgcls import progress
    from imgcls.report.html import write_report

    page = write_report(args.folder, args.out)
    progress.say(f"wrote {page}")
    return 0
