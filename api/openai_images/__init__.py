"""OpenAI's Images API over the native queue: `POST /v1/images/generations`, `/edits`, `/variations`.

`translation` maps the fields onto the native request models, `routes` queues through the native intake and answers
when the job ends (`waiting`), `mask` converts OpenAI's transparent-means-edit masks, and `errors` renders every
error on these paths in OpenAI's shape.
"""

from api.openai_images.errors import openai_error
from api.openai_images.routes import PATHS, router

__all__ = ["PATHS", "openai_error", "router"]
