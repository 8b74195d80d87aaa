"""The installed sdqueue version, read once from the package metadata.

It lives in `core` so that the API, the webhook sender and the CLI share one source without importing the `sdqueue`
package (which would be an upward import for `api/` and `core/`).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sdqueue")
except PackageNotFoundError:  # a source tree that was never installed (`pip install -e .` fixes it)
    __version__ = "0+unknown"
