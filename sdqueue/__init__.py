"""sdqueue: a self-hosted Stable Diffusion 1.x service (REST API, Redis queue, GPU workers)."""

__version__ = "0.1.0"
