"""docs/cli.md is generated from the parsers and TrainConfig: it must be current, and complete."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "cli_reference.py"


def _reference_module():
    spec = importlib.util.spec_from_file_location("cli_reference", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_command_reference_is_current():
    r = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_flag_without_help_text_fails_the_reference(monkeypatch):
    import imgcls.cli

    mod = _reference_module()
    real = imgcls.cli.build_parser

    def with_an_undocumented_flag():
        parser = real()
        sub = next(a for a in parser._actions if a.dest == "command")
        sub.choices["eval"].add_argument("--shiny")
        return parser

    monkeypatch.setattr(mod, "build_parser", with_an_undocumented_flag)
    with pytest.raises(SystemExit, match="--shiny"):
        mod.render()


def test_a_documented_new_flag_changes_the_reference(monkeypatch):
    import imgcls.cli

    mod = _reference_module()
    before = mod.render()
    real = imgcls.cli.build_parser

    def with_a_new_flag():
        parser = real()
        sub = next(a for a in parser._actions if a.dest == "command")
        sub.choices["eval"].add_argument("--shiny", help="a new flag")
        return parser

    monkeypatch.setattr(mod, "build_parser", with_a_new_flag)
    after = mod.render()
    assert "--shiny" in after and after != before  # so the --check test would fail until cli.md is rewritten


def test_every_environment_variable_the_code_reads_is_documented():
    import re

    mod = _reference_module()
    documented = " ".join(k for k, _ in mod.ENVIRONMENT)
    read = set()
    for p in (ROOT / "src" / "imgcls").rglob("*.py"):
        read |= set(re.findall(r"environ(?:\.get)?\(\s*[\"'](IMGCLS_[A-Z_]+)", p.read_text(encoding="utf-8")))
        read |= set(re.findall(r"environ\[[\"'](IMGCLS_[A-Z_]+)", p.read_text(encoding="utf-8")))
        read |= set(re.findall(r"_ENV\s*=\s*[\"'](IMGCLS_[A-Z_]+)", p.read_text(encoding="utf-8")))  # a named constant
    assert read, "the scan found no variable: the pattern is out of date"
    assert not [v for v in sorted(read) if v not in documented]
