"""The `sdqueue` command itself: its version and the list of sub-commands the README documents."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from core.version import __version__
from sdqueue.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def test_version_comes_from_the_package_metadata() -> None:
    declared = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), flags=re.MULTILINE)
    assert declared is not None
    assert __version__ == version("sdqueue") == declared.group(1)
    import sdqueue

    assert sdqueue.__version__ == __version__


def test_version_option_prints_it(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "sdqueue", "--version"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"sdqueue {__version__}\n"


def test_readme_lists_every_sub_command() -> None:
    parser = build_parser([])
    [sub] = [a for a in parser._actions if a.dest == "command"]
    commands = set(sub.choices)  # type: ignore[arg-type]
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `sdqueue ([a-z]+)", readme, flags=re.MULTILINE))
    assert documented == commands, f"missing: {sorted(commands - documented)}; unknown: {sorted(documented - commands)}"
    assert "`sdqueue --version`" in readme


def test_durable_submit_on_a_redis_that_cannot_promise_it_is_one_line_and_exit_2(
    tmp_path: Path, redis_url: str
) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "SDQ_REDIS_URL": redis_url, "SDQ_DURABLE_SUBMIT": "true",
           "SDQ_DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "sdqueue", "api", "--port", "0"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 2, result.stderr
    assert "SDQ_DURABLE_SUBMIT=true needs" in result.stderr and "appendonly yes" in result.stderr
    assert "Traceback" not in result.stderr
