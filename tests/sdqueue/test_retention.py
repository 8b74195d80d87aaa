"""Retention of result images on local storage (the S3 case runs against a server in test_storage_s3.py)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pytest

from core.settings import load_settings
from core.storage import make_storage
from core.storage.local import LocalStorage
from sdqueue import maintenance
from sdqueue.retention import cleanup


def test_retention_on_local_storage_removes_old_files_and_empty_job_folders(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "images", "http://api")
    storage.put("old/0.png", b"a", "image/png")
    storage.put("mixed/0.png", b"b", "image/png")
    storage.put("mixed/1.png", b"c", "image/png")
    now = time.time()
    day = 24 * 3600
    for key in ("old/0.png", "mixed/0.png"):
        os.utime(storage.path(key), (now - 2 * day, now - 2 * day))

    report = cleanup(storage, retention_s=day, now=now)

    assert (report.deleted, report.kept) == (2, 1)
    assert not (tmp_path / "images" / "old").exists()
    assert not storage.exists("mixed/0.png")
    assert storage.get("mixed/1.png") == b"c"
    with pytest.raises(ValueError, match="retention must be a positive"):
        cleanup(storage, retention_s=0)


def test_cleanup_command_uses_the_configured_retention(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_settings(data_dir=tmp_path, storage="local", result_retention_s=3600)
    storage = make_storage(settings)
    storage.put("old/0.png", b"a", "image/png")
    storage.put("new/0.png", b"b", "image/png")
    two_hours_ago = time.time() - 7200
    os.utime(tmp_path / "images" / "old" / "0.png", (two_hours_ago, two_hours_ago))
    parser = argparse.ArgumentParser()
    maintenance.configure_parser(parser)

    assert maintenance.run(parser.parse_args(["--dry-run"]), settings) == 0
    assert "would delete 1 images older than 3600 s (local storage), kept 1" in capsys.readouterr().out
    assert storage.exists("old/0.png")

    assert maintenance.run(parser.parse_args([]), settings) == 0
    assert not storage.exists("old/0.png") and storage.exists("new/0.png")

    assert maintenance.run(parser.parse_args(["--older-than", "0"]), settings) == 0
    assert "keeping every image" in capsys.readouterr().out.splitlines()[-1]
