from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from core.settings import load_settings
from core.storage import LocalStorage, make_storage


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "images", "http://host:8000/")


def test_put_get_exists_delete(storage: LocalStorage) -> None:
    storage.put("job/0.png", b"png bytes", "image/png")
    assert storage.exists("job/0.png")
    assert storage.get("job/0.png") == b"png bytes"
    assert (storage.root / "job" / "0.png").read_bytes() == b"png bytes"
    storage.delete("job/0.png")
    storage.delete("job/0.png")  # deleting twice is not an error
    assert not storage.exists("job/0.png")
    with pytest.raises(KeyError):
        storage.get("job/0.png")


def test_overwrite_replaces_and_leaves_no_temp_files(storage: LocalStorage) -> None:
    storage.put("job/0.png", b"first", "image/png")
    storage.put("job/0.png", b"second", "image/png")
    assert storage.get("job/0.png") == b"second"
    assert [p.name for p in (storage.root / "job").iterdir()] == ["0.png"]


def test_failed_write_keeps_the_old_file_and_no_temp_file(storage: LocalStorage) -> None:
    storage.put("job/0.png", b"old", "image/png")
    with pytest.raises(TypeError):
        storage.put("job/0.png", "not bytes", "image/png")  # type: ignore[arg-type]
    assert storage.get("job/0.png") == b"old"
    assert [p.name for p in (storage.root / "job").iterdir()] == ["0.png"]


def test_put_syncs_the_file_before_the_rename_and_each_directory_after(
    storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker marks a job succeeded once put returns: by then its bytes, its name and any folder created for it
    are on disk, so an OS crash cannot lose them."""
    (storage.root / "job").mkdir(parents=True)
    events: list[tuple[str, Path]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("replace", Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)

    storage.put("job/0.png", b"png bytes", "image/png")

    [(_, temp), *rest] = events
    assert temp.parent == storage.root / "job" and temp.name.startswith(".0.png.")  # the temp file, still unnamed
    assert rest == [("replace", storage.root / "job" / "0.png"), ("fsync", storage.root / "job")]

    events.clear()
    storage.put("new/sub/1.png", b"x", "image/png")

    # Each created folder's entry is synced in its parent, top down, before the file goes in.
    assert [e for e in events if e[0] == "fsync"][:2] == [("fsync", storage.root), ("fsync", storage.root / "new")]
    assert events[2][0] == "fsync" and events[2][1].parent == storage.root / "new" / "sub"
    assert events[3:] == [("replace", storage.root / "new" / "sub" / "1.png"), ("fsync", storage.root / "new" / "sub")]
    assert storage.get("new/sub/1.png") == b"x"


def test_a_reader_sees_a_whole_file_while_it_is_rewritten(storage: LocalStorage) -> None:
    versions = [bytes([i]) * (1 << 20) for i in range(1, 4)]
    storage.put("job/0.png", versions[0], "image/png")
    done = threading.Event()
    reads: list[bool] = []

    def read() -> None:
        while not done.is_set():
            reads.append(storage.get("job/0.png") in versions)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(30):
            storage.put("job/0.png", versions[i % 3], "image/png")
    finally:
        done.set()
        reader.join()
    assert reads and all(reads)


def test_url_points_at_the_api_route(storage: LocalStorage) -> None:
    assert storage.url("abc/0.png") == "http://host:8000/v1/images/abc/0.png"


@pytest.mark.parametrize("key", ["../x.png", "job/../../x.png", "/etc/passwd", "job\\..\\x", "", "job//0.png",
                                 "job/./0.png", "job/\x00.png"])
def test_keys_that_could_escape_are_refused(storage: LocalStorage, key: str) -> None:
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.put(key, b"x", "image/png")
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.get(key)
    assert not (storage.root.parent / "x.png").exists()


def test_symlink_leaving_the_root_is_refused(storage: LocalStorage, tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    storage.root.mkdir(parents=True)
    (storage.root / "job").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="outside the storage directory"):
        storage.put("job/0.png", b"x", "image/png")
    assert list((tmp_path / "outside").iterdir()) == []


def test_make_storage_local_keeps_images_under_the_data_dir(tmp_path: Path) -> None:
    storage = make_storage(load_settings(data_dir=tmp_path, public_url="https://sd.example.com"))
    assert isinstance(storage, LocalStorage)
    assert storage.root == (tmp_path / "images").resolve()
    assert storage.url("j/0.png") == "https://sd.example.com/v1/images/j/0.png"
