"""Progress bars for long work: tqdm on a terminal, a line a minute in a log."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

#: Seconds between progress lines when stderr is a file or a pipe (a log), not a terminal.
LOG_INTERVAL = 60.0


class _LogLines:
    """stderr for a progress bar when it is a log: each of tqdm's carriage-return updates becomes
    a line of its own."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int | None = None, enabled: bool = True, **options: Any) -> tqdm:
    """A tqdm bar on stderr. Written to a log (not a terminal) it prints a line a minute, from the
    first minute on, instead of an update per step; shorter work leaves no bar lines."""
    if sys.stderr.isatty():
        return tqdm(total=total, disable=not enabled, file=sys.stderr, dynamic_ncols=True, **options)
    return tqdm(total=total, disable=not enabled, file=_LogLines(sys.stderr), mininterval=LOG_INTERVAL,
                maxinterval=LOG_INTERVAL, delay=LOG_INTERVAL, **options)
