"""The denoising progress bar of `sdqueue generate` and `sdqueue submit`: tqdm on a terminal (step, it/s, ETA); on
anything else (a CI log, a pipe) plain lines with the same figures, one every few seconds and at the end, and no
carriage returns or escape codes."""

from __future__ import annotations

import io
import os
import sys
import time
from typing import TextIO

from tqdm import tqdm

LINE_EVERY_S = 5.0  # a non-terminal gets one line this often at most


class StepBar:
    def __init__(self, total: int, desc: str = "steps", stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.desc = desc
        self.step = 0
        self.tty = self.stream.isatty()
        self._bar = None
        if self.tty:
            # A terminal that reports no width (a fresh pty, some CI runners) would get an empty bar.
            sized = _columns(self.stream) > 0
            self._bar = tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=sized,
                             ncols=None if sized else 80)
        self._start = time.monotonic()
        self._last_line = -LINE_EVERY_S

    def update(self, step: int, total: int | None = None) -> None:
        """Show step `step` of `total` (the total may change: a job retried on another worker starts again)."""
        step = max(0, step)
        if total is not None and total != self.total:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
        if self._bar is not None:
            self._bar.update(step - self.step)
        else:
            now = time.monotonic()
            if step >= self.total or now - self._last_line >= LINE_EVERY_S:
                self._last_line = now
                self.stream.write(self._line(step, now) + "\n")
                self.stream.flush()
        self.step = step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _line(self, step: int, now: float) -> str:
        return tqdm.format_meter(step, self.total, now - self._start, prefix=self.desc, ascii=True,
                                 ncols=80)


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, io.UnsupportedOperation):
        return 0
