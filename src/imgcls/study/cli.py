"""``imgcls study``: its arguments and handler, registered by ``imgcls.cli``; imports no torch until run."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "study", help="run an ablation study (arms x seeds) from a YAML spec and compare the arms",
        description="Every arm x seed is an ordinary run folder OUT/runs/<arm>/seed<k>. Rerunning skips finished runs "
                    "and continues unfinished ones; results: OUT/report.html, summary.md, summary.csv, results.csv and plots.",
    )
    p.add_argument("spec", type=Path, help="study spec (YAML): name, data, base, seeds, arms[, baseline, panel_per_class, panel_layer]")
    p.add_argument("--out", type=Path, default=None, help="study folder (default runs/study-<spec name>)")
    p.add_argument("--data", default=None, metavar="PATH", help="use this data instead of the spec's data: (a folder, a CSV or fashion-mnist)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change one key of the spec's base config for every arm (repeatable)")
    p.add_argument("--rerun-stale", action="store_true", help="move runs whose config no longer matches the spec to OUT/stale/ and redo them")
    p.add_argument("--report-only", action="store_true", help="train nothing; aggregate the finished runs again")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: in this process, one run after another (with several GPUs, one subprocess per GPU; "
                        "with --jobs N on CPU, N subprocesses side by side); "
                        "ray: one Ray task per run, on this machine or a cluster (pip install -e '.[ray]')")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="with --executor local on CPU: N runs side by side, each a subprocess with its share of the cores, "
                        "and the runs still training take up the cores of those that end once none is left to start "
                        "(on 2 cores, --jobs 2 trained 11 %% more images a second than one run at a time; with one GPU "
                        "the N runs share it); default 1")
    p.add_argument("--address", default=None, metavar="auto|HOST:PORT",
                   help="with --executor ray: the cluster to use (auto: the one `ray start` began on this machine); "
                        "default: start a local Ray instance")
    p.set_defaults(handler=cmd_study)


def cmd_study(args: argparse.Namespace) -> int:
    import sys

    from imgcls.errors import Interrupted
    from imgcls.study.core import timed_study
    from imgcls.study.executors import make_executor
    from imgcls.study.spec import load_spec

    out = args.out or Path("runs") / f"study-{args.spec.stem}"
    study = load_spec(args.spec, data=args.data, sets=args.set)
    executor = make_executor(args.executor, address=args.address, jobs=args.jobs)
    try:
        timed_study(study, out, rerun_stale=args.rerun_stale, report_only=args.report_only, executor=executor)
    except Interrupted as e:  # the run saved a checkpoint; the study, not `train --resume`, continues it
        print(f"imgcls: {e}; rerun the same study command to continue where it stopped", file=sys.stderr)
        return 128 + e.signum
    return 0
