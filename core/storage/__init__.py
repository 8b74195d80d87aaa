"""Storage backends for result images; ``make_storage`` picks the one ``SDQ_STORAGE`` names."""

from __future__ import annotations

from core.settings import Settings
from core.storage.base import Storage, validate_key
from core.storage.local import LocalStorage

__all__ = ["LocalStorage", "Storage", "make_storage", "validate_key"]


def make_storage(settings: Settings) -> Storage:
    if settings.storage == "s3":
        # Imported here so that the local backend (the default) needs no boto3.
        from core.storage.s3 import S3Storage

        return S3Storage.from_settings(settings)
    # Local images live in {SDQ_DATA_DIR}/images, next to the dev Redis and the demo checkpoint.
    return LocalStorage(settings.data_dir / "images", settings.public_url)
