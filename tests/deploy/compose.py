"""Read docker-compose.yml as Docker Compose does: YAML with merge keys, then ``${VAR}`` interpolation."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"

# $$ (a literal $), ${NAME}, ${NAME:-default}, ${NAME-default}, $NAME
_VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def load_raw() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def variables(value: Any) -> set[str]:
    """Names of the variables a compose value interpolates (``$$`` is a literal and names none)."""
    if isinstance(value, str):
        return {m.group(2) or m.group(5) for m in _VARIABLE.finditer(value) if not m.group(1)}
    if isinstance(value, dict):
        return set().union(*(variables(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(variables(v) for v in value)) if value else set()
    return set()


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Substitute variables the way compose does; ``:-`` also replaces empty values, ``-`` only unset ones."""
    if isinstance(value, str):

        def substitute(m: re.Match[str]) -> str:
            if m.group(1):
                return "$"
            name = m.group(2) or m.group(5)
            current = env.get(name)
            if m.group(3) == ":-":
                return current if current else m.group(4)
            if m.group(3) == "-":
                return m.group(4) if current is None else current
            return current or ""

        return _VARIABLE.sub(substitute, value)
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    return value


def load(env: Mapping[str, str]) -> dict[str, Any]:
    """The compose model after interpolation with ``env`` (what `docker compose config` would show)."""
    return dict(interpolate(load_raw(), env))
