"""The name a worker's model is served under: SDQ_MODEL_NAME, else the checkpoint's stem made a valid model name."""

from __future__ import annotations

import re

from core.rules import MODEL_NAME_PATTERN
from worker.tasks import served_name


def test_the_configured_name_wins_else_the_stem_with_odd_characters_replaced() -> None:
    assert served_name("sd15", "v1-5-pruned-emaonly") == "sd15"
    assert served_name(None, "v1-5-pruned-emaonly") == "v1-5-pruned-emaonly"
    assert served_name(None, "My Model (v2)") == "My-Model-v2"
    assert served_name(None, "___") == "model"
    for stem in ("My Model (v2)", "épique", "a" * 300):
        assert re.fullmatch(MODEL_NAME_PATTERN, served_name(None, stem))
