"""Live progress lines (rich) with speed and ETA; quiet when ``IMGCLS_QUIET=1``, not rank 0, or inside
:func:`quiet` (the Python API's default: a library prints nothing unless asked)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False, soft_wrap=True)
_silenced: ContextVar[bool] = ContextVar("imgcls_silenced", default=False)


def enabled() -> bool:
    return not _silenced.get() and os.environ.get("IMGCLS_QUIET", "") != "1" and int(os.environ.get("RANK", "0")) == 0


@contextmanager
def quiet(on: bool = True) -> Iterator[None]:
    """No progress bars or lines inside (when ``on``); the previous setting comes back on exit."""
    token = _silenced.set(on or _silenced.get())
    try:
        yield
    finally:
        _silenced.reset(token)


class Task:
    def __init__(self, progress: Progress | None, task_id: int | None, unit: str):
        self._progress = progress
        self._id = task_id
        self._unit = unit
        self._start = time.perf_counter()
        self._done = 0

    def advance(self, n: int = 1, info: str = "") -> None:
        self._done += n
        if self._progress is None:
            return
        rate = self._done / max(time.perf_counter() - self._start, 1e-9)
        self._progress.update(self._id, advance=n, info=f"{rate:,.0f} {self._unit}/s {info}".rstrip())


@contextmanager
def task(description: str, total: int, *, unit: str = "img") -> Iterator[Task]:
    """A progress bar for ``total`` units; prints nothing when progress is disabled."""
    if not enabled() or total <= 0 or not console.is_terminal:  # logs get the summary lines only
        yield Task(None, None, unit)
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    with progress:
        tid = progress.add_task(description, total=total, info="")
        yield Task(progress, tid, unit)


def say(message: str) -> None:
    if enabled():
        console.print(message)
