"""The submit-time check of a job's `webhook`: refused with a 422 on that field unless this server may send to it.

The request model checks the URL's form; this adds what needs the operator's settings and DNS: a signing secret is
configured, and every address the host resolves to is public or allowed. The sender checks again at delivery.
"""

from __future__ import annotations

from anyio import to_thread
from fastapi.exceptions import RequestValidationError

from core.jobs import GenerationParams
from core.settings import Settings
from core.webhooks import AllowList, WebhookURLError, check_webhook_url


async def check_webhook(params: GenerationParams, settings: Settings) -> None:
    """Raise RequestValidationError (422, loc ["body", "webhook"]) when the job's webhook cannot be accepted."""
    url = params.webhook
    if url is None:
        return
    if settings.webhook_secret is None:
        _refuse(url, "webhook: this server does not send webhooks (its operator has not set SDQ_WEBHOOK_SECRET)")
    try:
        # getaddrinfo blocks (up to the resolver's timeout): keep it off the event loop.
        await to_thread.run_sync(
            lambda: check_webhook_url(
                url,
                allow_private=settings.webhook_allow_private,
                allowed=AllowList.parse(settings.webhook_allowed_hosts),
            )
        )
    except WebhookURLError as exc:
        _refuse(url, str(exc))


def _refuse(url: str, message: str) -> None:
    raise RequestValidationError(
        [{"type": "value_error", "loc": ("body", "webhook"), "msg": message, "input": url}]
    )
