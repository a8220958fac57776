"""Write docs/cli.md from the CLI's parsers and the TrainConfig dataclass, or check that it is current.

    python docs/cli_reference.py            # rewrite docs/cli.md
    python docs/cli_reference.py --check    # exit 1 if docs/cli.md differs from what the code gives

The reference is generated rather than written so that it cannot drift: a test runs ``--check``, and a flag
or config key without help text is an error here, not an empty row.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

from imgcls import config as config_mod
from imgcls.cli import HELP, build_parser

OUT = Path(__file__).resolve().parent / "cli.md"

# Not derivable from the parsers: what the process reads from its environment and how it exits.
ENVIRONMENT = [
    ("IMGCLS_CACHE", "folder of the decoded-image cache (default `~/.cache/imgcls`)"),
    ("IMGCLS_QUIET", "`1` silences progress bars and summary lines (errors still print)"),
    ("IMGCLS_FASHION_MNIST_DIR", "where the Fashion-MNIST IDX files are (default `/usr/share/datasets/fashion-mnist`)"),
    ("IMGCLS_MALLOC", "`default` keeps glibc's own malloc settings instead of imgcls' (no heap trimming)"),
    ("IMGCLS_THREADS_FILE", "set by `imgcls study --jobs N` for each run it starts, not by users: a file with the run's "
     "CPU thread count, which the study raises when other runs end and none is left to start"),
    ("RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT", "set by `torchrun`: one run over several processes"),
    ("CUDA_VISIBLE_DEVICES", "the GPUs a study spreads its runs over (one run per GPU)"),
]
EXIT_CODES = [
    ("0", "done"),
    ("2", "a clear error (bad data, config, run folder, checkpoint); one line on stderr"),
    ("3", "out of memory (host or device)"),
    ("128 + N", "stopped by signal N (130 for Ctrl-C, 143 for SIGTERM); a training run saved a resumable checkpoint"),
]


def _type_name(tp) -> str:
    if typing.get_origin(tp) is tuple:
        return "list"
    return getattr(tp, "__name__", str(tp))


def _row(*cells: str) -> str:
    """One table row; a ``|`` inside a cell ("adam | adamw | sgd") is escaped, or it would end the cell."""
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _default(action: argparse.Action) -> str:
    if action.default in (None, argparse.SUPPRESS) or action.default == []:
        return ""
    return f"`{action.default}`"


def _options(parser: argparse.ArgumentParser, *, config_flags: set[str]) -> list[str]:
    rows = ["| argument | default | meaning |", "| --- | --- | --- |"]
    missing = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction) or a.dest == "command":
            continue
        name = ", ".join(a.option_strings) or a.dest.upper()
        if a.dest in config_flags:
            continue  # listed once, under config keys
        if not a.help:
            missing.append(name)
        if a.choices and not isinstance(a, argparse._SubParsersAction):
            name += " {" + ",".join(map(str, a.choices)) + "}"
        rows.append(_row(f"`{name}`", _default(a), (a.help or "").replace("%%", "%")))
    if missing:
        raise SystemExit(f"{parser.prog}: argument(s) without help text: {', '.join(missing)}")
    return rows


def render() -> str:
    # argparse wraps usage to the terminal's width: fix it, so the file does not depend on who ran the script
    width, os.environ["COLUMNS"] = os.environ.get("COLUMNS"), "100"
    try:
        return _render()
    finally:
        if width is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = width


def _render() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    keys = config_mod.field_names()
    hints = typing.get_type_hints(config_mod.TrainConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(config_mod.TrainConfig)}
    out = [
        "# Command reference",
        "",
        "Generated from the parsers and `TrainConfig` by `python docs/cli_reference.py`; a test fails when they",
        "disagree. The README's tour shows the commands at work.",
        "",
    ]
    for name, p in sub.choices.items():
        out += [f"## imgcls {name}", "", "```", p.format_usage().strip(), "```", ""]
        if p.description:
            out += [p.description, ""]
        out += _options(p, config_flags=set(keys) if name == "train" else set())
        if name == "train":
            out += ["", "Every config key below is also a `train` flag (`img_size` is `--img-size`; booleans take `--no-...`)."]
        out.append("")
    out += ["## Config keys", "", "Precedence, lowest first: defaults < `--recipe` < `--config FILE` < flags < `--set key=value`.",
            "With neither `model` nor `recipe` stated, `train` uses the recipe `" + config_mod.DEFAULT_RECIPE + "`.", "",
            "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    undocumented = [k for k in keys if k != "data" and not HELP.get(k)]
    if undocumented:
        raise SystemExit(f"config key(s) without help text in imgcls.cli.HELP: {', '.join(undocumented)}")
    for k in keys:
        d = defaults[k]
        shown = "" if k == "data" else f"`{list(d) if isinstance(d, tuple) else d}`"
        out.append(_row(f"`{k}`", _type_name(hints[k]), shown, HELP.get(k, "the data: positional DATA of train").replace("%%", "%")))
    out += ["", "Recipes (values they set; anything stated explicitly wins):", ""]
    for r, vals in config_mod.RECIPE_DEFAULTS.items():
        if vals:
            out.append(f"- `{r}`: " + ", ".join(f"`{k}={v}`" for k, v in vals.items()))
    out += ["", "## Environment", "", "| variable | meaning |", "| --- | --- |"]
    out += [_row(f"`{k}`", v) for k, v in ENVIRONMENT]
    out += ["", "## Exit codes", "", "| code | meaning |", "| --- | --- |"]
    out += [_row(str(k), v) for k, v in EXIT_CODES]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is not what the code gives")
    args = ap.parse_args()
    text = render()
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.is_file() else ""
        if current != text:
            print(f"{OUT.name} is out of date: run python docs/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
