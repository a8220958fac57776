"""Command line: parse, build the typed config, call one function, turn errors into exit codes."""

from __future__ import annotations

import argparse
import shlex
import sys
import typing
from pathlib import Path

from imgcls import __version__
from imgcls import config as config_mod
from imgcls.audit import cli as audit_cli
from imgcls.errors import ImgclsError, Interrupted
from imgcls.explain import cli as explain_cli
from imgcls.report import cli as report_cli
from imgcls.study import cli as study_cli

HELP = {
    "data": "a folder (train/ and test/ splits, or class folders), a CSV of path,label[,split], or fashion-mnist",
    "img_size": "square input size in pixels (0 = the data's most common size, at most --max-img-size)",
    "max_img_size": "ceiling of the automatic input size (224; 160 under fast-finetune)",
    "exclude_classes": "comma-separated class names to leave out of training and evaluation",
    "model": "any timm model name (resnet18, resnet50, efficientnet_lite0, ...)",
    "pretrained": "start from ImageNet weights (efficientnet_lite0/1/2: shipped in packages, no network needed)",
    "weights": "a local weights file (.safetensors, or a tensors-only .pth)",
    "weights_partial": "use --weights even when they fill under 90 %% of the model's parameters (another architecture?)",
    "norm": "default, or none to remove every normalisation layer",
    "freeze": "keep the first N feature stages (stem = 1) frozen",
    "augment": "none | flip | flip-rotate (seed's default) | rrc | randaugment | strong",
    "ema": "EMA decay of the weights (e.g. 0.998); 0 = off",
    "tta": "flip test-time augmentation in evaluation",
    "patience": "early stopping after N epochs without a better validation score (the select key; 0 = off)",
    "recipe": "none | fast-finetune (sets defaults; explicit flags win). With neither --model nor --recipe, "
    "train uses fast-finetune; --recipe none (or naming a --model) trains from scratch",
    "precision": "auto | fp32 | bf16 | fp16 (auto: bf16 where measured faster for the model and device; see README)",
    "channels_last": "auto | on | off",
    "device": "auto | cpu | cuda | cuda:N",
    "keep": "share of validation images kept by the 'unknown' threshold (default 0.95)",
    "split_seed": "seed of the train/val/test carving (kept fixed across training seeds)",
    "val_fraction": "share of the training images held out for validation when the data has no val/",
    "test_fraction": "share held out for testing when DATA is a plain folder of classes",
    "max_bad_fraction": "largest share of unreadable files in a split before training or evaluation stops with an error",
    "dropout": "dropout before the classifier",
    "drop_path": "stochastic depth rate (models that support it)",
    "optimizer": "adam | adamw | sgd (Nesterov; plain SGD with --momentum 0)",
    "lr": "peak learning rate",
    "weight_decay": "weight decay",
    "momentum": "SGD momentum",
    "schedule": "cosine (to 1 %% of lr) | constant, after the warmup",
    "warmup_epochs": "linear warmup from 1 %% of lr, in epochs (fractions allowed)",
    "label_smoothing": "label smoothing of the cross-entropy loss",
    "grad_clip": "clip the gradient norm to this value (0 = off)",
    "accum_steps": "batches accumulated per optimizer step",
    "epochs": "epochs to train",
    "low_res": "progressive resizing: train the first --low-res-epochs epochs at this size in pixels (cheaper steps), "
    "the rest and all evaluation at --img-size (0 = off)",
    "low_res_epochs": "how many of the first epochs train at --low-res",
    "batch_size": "images per batch (per process under torchrun)",
    "seed": "seed of the weights' init, the batch order and the augmentation",
    "tensorboard": "write TensorBoard event files under RUN/tensorboard (default on)",
    "resize": "squash (default) | crop (centre square) | pad (to a square, ImageNet-mean grey): how images become square",
    "balance": "none | sampler (every class drawn equally often) | weights (effective-number loss weights)",
    "select": "accuracy | macro_f1 | balanced_accuracy: the val score that picks the best checkpoint",
}


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field, named like the field; default None so only explicit flags count."""
    hints = typing.get_type_hints(config_mod.TrainConfig)
    for name in config_mod.field_names():
        if name == "data":
            continue
        flag = "--" + name.replace("_", "-")
        tp = hints[name]
        h = HELP.get(name)
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=h)
        elif typing.get_origin(tp) is tuple:
            p.add_argument(flag, default=None, metavar="A,B", help=h)
        else:
            p.add_argument(flag, default=None, metavar=name.upper(), help=h)


def _explicit_flags(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k in config_mod.field_names() and v is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgcls", description="Train, evaluate, explain and study image classifiers.")
    parser.add_argument("--version", action="version", version=f"imgcls {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a classifier on DATA, then evaluate it on the test split")
    t.add_argument("data", nargs="?", help=HELP["data"])
    t.add_argument("--out", type=Path, default=None, help="run folder (default runs/<data>-<model>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--config", type=Path, default=None, help="YAML/JSON file of config keys")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    _add_config_flags(t)

    e = sub.add_parser("eval", help="evaluate a run on its test split or on DATA")
    e.add_argument("run", type=Path, help="a run folder")
    e.add_argument("data", nargs="?", default=None, help="other data to evaluate (default: the run's own test split)")
    e.add_argument("--out", type=Path, default=None, help="folder for metrics.json and plots (default RUN/eval)")
    e.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="flip test-time augmentation (default: as the run was trained)")
    e.add_argument("--device", default="auto", help=HELP["device"])
    e.add_argument("--max-bad-fraction", default=None, metavar="MAX_BAD_FRACTION",
                   help="largest share of unreadable files in the evaluated data before eval stops with an error (default: the run's)")

    pr = sub.add_parser("predict", help="top-k labels for images, folders or globs")
    pr.add_argument("run", type=Path, help="a run folder, or an ONNX file made by imgcls export")
    pr.add_argument("paths", nargs="+", help="images, folders (recursive) or quoted globs")
    pr.add_argument("--out", type=Path, default=None, help="a .csv or .json file (default: print)")
    pr.add_argument("--topk", type=int, default=5, help="labels per image in the file (printing shows the first)")
    pr.add_argument("--device", default="auto", help=HELP["device"])
    pr.add_argument("--unknown", action=argparse.BooleanOptionalAction, default=True,
                    help="add the columns unknown and score (the run's rejection threshold); --no-unknown leaves them out")

    x = sub.add_parser("export", help="export a run's best checkpoint to ONNX or TorchScript, checked against the run")
    x.add_argument("run", type=Path, help="a run folder (its best checkpoint is exported)")
    x.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="onnx (default) or torchscript")
    x.add_argument("--out", type=Path, default=None, help="the file to write (default RUN/model.onnx or RUN/model.pt)")
    x.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")

    d = sub.add_parser("demo", help="train and evaluate a small model on Fashion-MNIST (a few minutes on a laptop)")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder")
    d.add_argument("--epochs", type=int, default=None, help="epochs (default 4)")

    explain_cli.add_parser(sub)
    audit_cli.add_parser(sub)
    study_cli.add_parser(sub)
    report_cli.add_parsers(sub)
    return parser


def _print_summary(summary: dict, run_dir: Path) -> None:
    from imgcls import progress

    if not summary:
        return
    lines = [""]
    if "test_accuracy" in summary:
        from imgcls.report.intervals import fmt_num, fmt_pct

        lines.append(
            f"test accuracy {fmt_pct(summary['test_accuracy'], summary.get('test_accuracy_ci'))}  "
            f"macro-F1 {fmt_num(summary['test_macro_f1'], summary.get('test_macro_f1_ci'))}  "
            f"ECE {summary['test_ece']:.3f}  (best val {summary['best_val_acc']:.2%} at epoch {summary['best_epoch']})"
        )
    lines.append(f"trained {summary['epochs_run']} epoch(s) at {summary['train_img_per_s']:,.0f} img/s; wall {summary['wall_s']:.0f}s")
    lines.append(f"run folder: {run_dir}")
    lines.append("  config.json, data_report.json, metrics.csv, curves.png, checkpoints/best.safetensors")
    if (run_dir / "eval").is_dir():
        lines.append("  eval/metrics.json, eval/predictions.csv, eval/confusion_matrix*.png, eval/misclassified.png")
    if (run_dir / "report.html").is_file():
        lines.append("  report.html (one self-contained page of all of it)")
    for line in lines:
        progress.say(line)


def cmd_train(args: argparse.Namespace) -> int:
    try:
        return _train(args)
    except ImgclsError as e:
        from imgcls.engine import runtime as rt_mod

        # under torchrun, an error before training joined the others would leave them waiting for this rank
        rt_mod.stop_every_rank(str(e), device=getattr(args, "device", None) or "auto")
        raise


def _train(args: argparse.Namespace) -> int:
    from imgcls.runs import train_and_evaluate

    if args.resume:
        if args.out is None:
            raise ImgclsError("--resume needs --out RUN (the run folder to continue)")
        cfg = _resumed_config(args)
        run_dir = args.out
    else:
        flags = _explicit_flags(args)
        if args.data is not None:
            flags["data"] = args.data
        stated = config_mod.stated(flags=flags, file=args.config, sets=args.set)
        cfg = config_mod.resolve(flags=flags, file=args.config, sets=args.set, default_recipe=config_mod.DEFAULT_RECIPE)
        if not cfg.data:
            raise ImgclsError("no data: give DATA (a folder, a CSV or fashion-mnist), or data: in --config")
        run_dir = args.out or Path("runs") / f"{Path(cfg.data).resolve().name or 'data'}-{cfg.model}"
        if "model" not in stated and "recipe" not in stated:
            from imgcls import progress

            progress.say(
                f"recipe {cfg.recipe}: {'pretrained ' if cfg.pretrained else ''}{cfg.model}, {cfg.epochs} epochs (no --model or --recipe given); "
                "to train from scratch instead: --model resnet18, or --recipe none"
            )
    try:
        summary = train_and_evaluate(cfg, run_dir=run_dir, resume=args.resume)
    except Interrupted as e:
        e.resume_command = f"imgcls train --resume --out {shlex.quote(str(run_dir))}"
        raise
    _print_summary(summary, run_dir)
    progress_next(run_dir)
    return 0


def progress_next(run_dir: Path) -> None:
    """The commands to copy next, with the real run folder."""
    from imgcls import progress

    q = shlex.quote(str(run_dir))
    progress.say(f"next: imgcls eval {q}   |   imgcls predict {q} IMAGE...   |   imgcls explain {q} IMAGE...")


# What --resume may change: where and how long the run continues, and what it reports.
RESUME_MAY_CHANGE = ("epochs", "patience", "device", "tensorboard")


def _resumed_config(args: argparse.Namespace) -> config_mod.TrainConfig:
    """The stored config of ``--out``, with the options a resume may change. The same command plus
    ``--resume`` is the natural way to continue a run, so restating an option with its stored value is
    fine; a real change is refused, naming the key, the stored value and the given one."""
    stored = config_mod.load(args.out / "config.json")
    flags = _explicit_flags(args)
    if args.data is not None:
        flags["data"] = args.data
    given = config_mod.coerce_dict(config_mod.stated(flags=flags, file=args.config, sets=args.set), where="--resume")
    changes = {}
    for key, value in given.items():
        old = getattr(stored, key)
        if key in RESUME_MAY_CHANGE:
            changes[key] = value
        elif not _same_setting(key, old, value):
            may = ", ".join(RESUME_MAY_CHANGE)
            raise ImgclsError(f"--resume cannot change {key}: the run has {old!r}, the command gives {value!r} (only {may} may change)")
    return stored.replace(**changes)


def _same_setting(key: str, old, new) -> bool:
    if old == new:
        return True
    if key == "data":  # the same folder or file, however it is spelled
        return Path(str(old)).expanduser().resolve() == Path(str(new)).expanduser().resolve()
    if key == "img_size":  # 0 means "from the data": the run stored the size it derived
        return new == 0
    return False


def cmd_eval(args: argparse.Namespace) -> int:
    from imgcls import progress
    from imgcls.runs import eval_command

    metrics = eval_command(args.run, args.data, args.out, tta=args.tta, device=args.device, max_bad_fraction=args.max_bad_fraction)
    out = args.out or args.run / "eval"
    from imgcls.report.intervals import fmt_num, fmt_pct

    ci = metrics.get("intervals", {})
    progress.say(f"accuracy {fmt_pct(metrics['accuracy'], ci.get('accuracy'))} on {metrics['n']:,} images  "
                 f"macro-F1 {fmt_num(metrics['macro_f1'], ci.get('macro_f1'))}  "
                 f"balanced accuracy {fmt_pct(metrics['balanced_accuracy'], ci.get('balanced_accuracy'))}  ECE {metrics['ece']:.3f}"
                 + (f"  top-5 {metrics['top5']:.2%}" if "top5" in metrics else ""))
    cal, unk = metrics["calibration"], metrics["unknown"]
    progress.say(f"calibration: temperature {cal['temperature']:.3f}  ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}  "
                 f"NLL {cal['nll_before']:.3f} -> {cal['nll_after']:.3f}" + (f"  ({cal['note']})" if "note" in cal else ""))
    if "flagged_test" in unk:
        line = f"unknown: {unk['flagged_test']:.1%} of test images flagged ({unk['score']} < {unk['threshold']:.3f})"
        if "flagged_left_out" in unk:
            line += f"; left-out classes: {unk['flagged_left_out']:.1%} flagged, AUROC {unk['auroc']:.3f}, FPR@95% {unk['fpr_at_95']:.1%}"
        progress.say(line)
    worst = sorted(metrics["per_class"].items(), key=lambda kv: kv[1]["f1"])[:3]
    progress.say("weakest classes: " + ", ".join(f"{k} F1 {v['f1']:.2f}" for k, v in worst))
    if metrics["most_confused"]:
        p = metrics["most_confused"][0]
        progress.say(f"most confused: {p['true']} -> {p['predicted']} ({p['count']} images)")
    progress.say(f"files: {out}/metrics.json, predictions.csv, confusion_matrix*.png, misclassified.png, reliability.png")
    if Path(out).resolve() == (Path(args.run) / "eval").resolve():
        progress.say(f"page: {Path(args.run) / 'report.html'} (updated)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from imgcls import progress
    from imgcls.runs import predict_command

    rows, skipped = predict_command(args.run, args.paths, args.out, topk=args.topk, device=args.device, unknown=args.unknown)
    if args.out is None:
        for r in rows:
            print(f"{r['path']}\t{r['label']}\t{r['confidence']:.3f}" + ("\tunknown" if r.get("unknown") else ""))
    else:
        progress.say(f"{len(rows)} prediction(s) written to {args.out}")
    for s in skipped:
        progress.say(f"skipped {s['path']}: {s['reason']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from imgcls import progress
    from imgcls.deploy.export import export_run

    path, parity = export_run(args.run, fmt=args.format, out=args.out, opset=args.opset)
    progress.say(
        f"{path}: top-1 agreement {parity['top1_agreement']:.2%} with the run on {parity['images']} {parity['split']} images, "
        f"max |prob difference| {parity['max_abs_prob_diff']:.2e}  (details: {path.name}.parity.json)"
    )
    return 0


# Sized for a 2-core laptop: ResNet-10t at 28 px trains at ~1,100 img/s there (ResNet-18: ~700).
DEMO = {
    "data": "fashion-mnist",
    "model": "resnet10t",
    "img_size": 28,
    "epochs": 4,
    "batch_size": 256,
    "optimizer": "adamw",
    "lr": 3e-3,
    "weight_decay": 0.05,
    "augment": "flip",
    "label_smoothing": 0.1,
}


def cmd_demo(args: argparse.Namespace) -> int:
    from imgcls import progress
    from imgcls.runs import train_and_evaluate

    settings = dict(DEMO)
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    cfg = config_mod.from_dict(settings)
    if (args.out / "checkpoints" / "last.safetensors").exists():
        raise ImgclsError(f"{args.out} already holds a run: remove it or pass --out DIR")
    progress.say(f"demo: {cfg.model} on Fashion-MNIST at {cfg.img_size}px for {cfg.epochs} epochs")
    summary = train_and_evaluate(cfg, run_dir=args.out)
    _print_summary(summary, args.out)
    progress_next(args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "demo": cmd_demo, "export": cmd_export}
    handler = handlers.get(args.command) or getattr(args, "handler", None)
    try:
        return handler(args)
    except ImgclsError as e:
        print(f"imgcls: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        again = getattr(e, "resume_command", None) or "the same command"
        print(f"imgcls: {e}; a resumable checkpoint was saved (continue with: {again})", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("imgcls: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("imgcls: error: out of memory; try a smaller --batch-size or --img-size", file=sys.stderr)
        return 3
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            print("imgcls: error: the device ran out of memory; try a smaller --batch-size or --img-size", file=sys.stderr)
            return 3
        raise



