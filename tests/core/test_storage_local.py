from __future__ import annotations

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
