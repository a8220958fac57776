"""``imgcls explain``: its arguments and handler, registered by ``imgcls.cli``; imports no torch until run."""

from __future__ import annotations

import argparse
from pathlib import Path

METHOD_NAMES = ("gradcam", "gradcam++", "eigencam", "layercam", "scorecam")  # == cam.METHODS, without importing torch


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="CAM heat maps, overlays and faithfulness scores for images, folders or globs")
    p.add_argument("run", type=Path, help="a run folder")
    p.add_argument("paths", nargs="+", help="images, folders (recursive) or globs")
    p.add_argument("--method", default="gradcam", choices=[*METHOD_NAMES, "all"], help="CAM method, or all of them")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN/explain)")
    p.add_argument("--layer", default=None, metavar="NAME", help="dotted module name (default: the family table's layer, e.g. layer4 or bn2, else the last module giving forward_features' map)")
    p.add_argument("--class", dest="target_class", default=None, metavar="NAME", help="explain this class instead of the prediction (why not NAME?)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(handler=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from imgcls import progress
    from imgcls.explain.core import explain_paths

    out = args.out or args.run / "explain"
    doc = explain_paths(
        args.run, args.paths, out, method=args.method, layer=args.layer, target=args.target_class,
        batch_size=args.batch_size, device=args.device,
    )
    for s in doc["skipped"]:
        progress.say(f"skipped {s['path']}: {s['reason']}")
    progress.say(f"explained {doc['n_images']} image(s) with {', '.join(doc['methods'])} at layer {doc['layer']}")
    for m, s in doc["summary"].items():
        progress.say(f"  {m:10s} deletion AUC {s['mean_deletion_auc']:.3f} (lower is better)  insertion AUC {s['mean_insertion_auc']:.3f} (higher is better)")
    progress.say(f"files: {out}/explain.json, {out}/<method>_grid.png, {out}/<method>/*.png")
    return 0
