"""The progress bar of `generate` and `submit`: tqdm on a terminal; plain lines, with the same figures and no
control characters, anywhere else (a CI log, a pipe)."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

from sdqueue.progress import StepBar

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but tab and newline
ROOT = Path(__file__).resolve().parents[2]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_the_bar_is_plain_lines_a_few_seconds_apart_and_the_last_step() -> None:
    out = io.StringIO()
    bar = StepBar(20, stream=out)
    for step in range(1, 21):
        bar.update(step, 20)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the first step, then (all within 5 s) only the last
    assert re.fullmatch(r"steps: +5%\|[#0-9 ]+\| 1/20 \[.*it/s\]", lines[0]), lines
    assert re.fullmatch(r"steps: 100%\|#+\| 20/20 \[[0-9:]+<[0-9:]+, +[0-9.]+it/s\]", lines[1]), lines
    assert not CONTROL.search(out.getvalue())


def test_on_a_terminal_it_is_tqdm_redrawing_one_line() -> None:
    out = Terminal()
    bar = StepBar(4, stream=out)
    for step in range(1, 5):
        bar.update(step)
    bar.close()
    assert "\r" in out.getvalue() and "4/4" in out.getvalue() and "it/s" in out.getvalue()


def test_a_terminal_that_reports_no_width_still_gets_a_bar() -> None:
    master, slave = pty.openpty()  # a new pty is 0 x 0 until someone sets its size
    try:
        with os.fdopen(slave, "w", closefd=False) as out:
            bar = StepBar(4, stream=out)
            bar.update(4)
            bar.close()
        written = ""
        while select.select([master], [], [], 0.5)[0]:  # all of it: a pty read returns what one write put there
            written += os.read(master, 4096).decode()
    finally:
        os.close(slave)
        os.close(master)
    assert "4/4" in written and "it/s" in written


def test_a_total_that_changes_is_followed() -> None:
    out = io.StringIO()
    bar = StepBar(30, stream=out)
    bar.update(15, 15)  # img2img: only int(steps * strength) steps run
    assert "15/15" in out.getvalue() and "100%" in out.getvalue()


def test_generate_off_a_terminal_writes_no_control_characters(tmp_path: Path) -> None:
    from model import weights

    checkpoint = weights.save_random_checkpoint(tmp_path / "tiny.safetensors", *weights.tiny_configs())
    run = subprocess.run([sys.executable, "-m", "sdqueue", "generate", "a cat", "--checkpoint", str(checkpoint),
                          "--width", "64", "--height", "64", "--steps", "3", "--dtype", "float32", "-o",
                          str(tmp_path / "cat.png")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert re.search(r"steps: 100%\|#+\| 3/3 ", run.stderr), run.stderr
    assert not CONTROL.search(run.stderr + run.stdout), repr(run.stderr)
    assert (tmp_path / "cat.png").is_file()
