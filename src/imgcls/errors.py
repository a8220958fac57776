"""The exceptions a caller handles: a problem the user can fix, and a run stopped by a signal.

Standard library only, so that the CLI can catch both without importing torch.
"""

from __future__ import annotations

import signal


class ImgclsError(Exception):
    """A problem with the user's input, data, config or files, explained in the message."""


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; a resumable checkpoint was saved at the step boundary."""

    def __init__(self, signum: int, where: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")
        self.signum = signum
