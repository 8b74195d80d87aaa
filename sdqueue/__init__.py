"""sdqueue: a self-hosted Stable Diffusion 1.x service (REST API, Redis queue, GPU workers)."""

from core.version import __version__

__all__ = ["__version__"]
