"""AUTOMATIC1111's API (`/sdapi/v1`) over sdqueue's queue, so that A1111 clients (the `webuiapi` package, Krita
plugins, Open WebUI, SillyTavern, bots) work unchanged.

A thin layer: `models` parses A1111's wire format, `translate` maps it onto the native request models (the one home
of that mapping), `generate` submits through the native intake and answers once the job has ended
(`api.sync_jobs`), with `info` building A1111's answer from the stored files. `progress` and `catalog` answer
A1111's other calls.
"""

from __future__ import annotations

from fastapi import APIRouter

from api.a1111 import catalog, generate, progress

router = APIRouter()
for module in (generate, progress, catalog):
    router.include_router(module.router)
