"""The atomic writers, and what importing imgcls costs a library user (no torch, no matplotlib backend)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from imgcls.io import atomic_write_bytes, write_csv, write_json, write_text


def test_writers_round_trip(tmp_path):
    write_json(tmp_path / "a" / "doc.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "a" / "doc.json").read_text()) == {"x": [1, 2]}
    write_csv(tmp_path / "t.csv", ["path", "p"], [["a,b.jpg", 0.5], {"p": 1, "path": "c.jpg"}, {"path": "d.jpg"}])
    with (tmp_path / "t.csv").open(newline="") as f:
        assert list(csv.reader(f)) == [["path", "p"], ["a,b.jpg", "0.5"], ["c.jpg", "1"], ["d.jpg", ""]]
    write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # fails inside the write, after the temp file exists
    assert json.loads(target.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def _run(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_and_package_import_without_torch():
    # a command that needs no model (a missing study spec) runs and fails without loading torch or timm
    _run("import sys, imgcls, imgcls.cli; assert imgcls.cli.main(['study', 'missing.yaml', '--report-only']) == 2; "
         "assert 'torch' not in sys.modules, 'torch imported'; assert 'timm' not in sys.modules")


def test_plots_leave_the_users_matplotlib_alone(tmp_path):
    _run(
        "import sys, matplotlib; matplotlib.use('svg'); "
        "from pathlib import Path; from imgcls.report import plots; from imgcls.study import plots as sp; "
        f"p = plots.confusion_matrix([[3, 1], [0, 4]], ['a', 'b'], Path({str(tmp_path)!r}) / 'cm.png', normalize=True); "
        "assert p.read_bytes()[:4] == b'\\x89PNG'; "
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend(); "
        "assert 'matplotlib.pyplot' not in sys.modules"
    )


def test_written_files_get_the_usual_mode_not_mkstemps_0600(tmp_path):
    from imgcls import io

    p = io.write_json(tmp_path / "m.json", {"a": 1})
    assert p.stat().st_mode & 0o777 == 0o666 & ~io._UMASK  # 0644 under the usual umask 022, as open() gives
