"""Studies: expand a spec into arm x seed runs, run them resumably, and compare the arms with the
baseline (mean, 95% CI, paired t-test or McNemar, Holm), per class, per confusion and per left-out class.

Names load on first use, so ``imgcls --help`` (which imports ``imgcls.study.cli``) stays light.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "Study": "spec",
    "load_spec": "spec",
    "parse_spec": "spec",
    "StudyResult": "core",
    "aggregate": "core",
    "run_study": "core",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"imgcls.study.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'imgcls.study' has no attribute {name!r}")
