from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest

from core.settings import (
    CLIENT_VARIABLES,
    COMPOSE_VARIABLES,
    Settings,
    SettingsError,
    load_settings,
    unknown_variables,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No SDQ_ variable or .env file from the machine running the tests."""
    for name in [n for n in os.environ if n.startswith("SDQ_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_are_valid() -> None:
    settings = load_settings()
    assert settings.storage == "local" and settings.checkpoint is None
    assert settings.public_url == "http://127.0.0.1:8000"


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SDQ_REDIS_URL", "redis://redis:6379/2")
    monkeypatch.setenv("SDQ_CHECKPOINT", str(tmp_path / "v1-5.safetensors"))
    monkeypatch.setenv("SDQ_MAX_BATCH_IMAGES", "4")
    settings = load_settings()
    assert settings.redis_url == "redis://redis:6379/2"
    assert settings.checkpoint == tmp_path / "v1-5.safetensors"
    assert settings.max_batch_images == 4
    assert {"redis_url", "checkpoint", "max_batch_images"} <= settings.model_fields_set


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SDQ_STORAGE=s3\nSDQ_DEVICE=cpu\n")
    settings = load_settings()
    assert (settings.storage, settings.device) == ("s3", "cpu")


@pytest.mark.parametrize(
    ("name", "value", "rule"),
    [
        ("SDQ_MAX_BATCH_IMAGES", "0", "greater than or equal to 1"),
        ("SDQ_STORAGE", "ftp", "'local' or 's3'"),
        ("SDQ_DEVICE", "tpu", "'auto', 'cpu', 'cuda' or 'mps'"),
        ("SDQ_JOB_RETRIES", "many", "valid integer"),
        ("SDQ_QUEUE_PREFIX", "Bad Prefix!", "should match pattern"),
    ],
)
def test_bad_variable_is_named_in_the_error(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                             rule: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert f"{name}:" in message and rule in message and repr(value) in message


def test_every_wrong_variable_is_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDQ_DTYPE", "float8")
    monkeypatch.setenv("SDQ_HEARTBEAT_S", "0")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "SDQ_DTYPE:" in str(info.value) and "SDQ_HEARTBEAT_S:" in str(info.value)


def test_cli_exits_2_with_the_message_on_bad_settings(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "SDQ_STORAGE": "ftp", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "sdqueue", "api"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "SDQ_STORAGE:" in result.stderr and "'ftp'" in result.stderr


def test_a_misspelt_variable_is_reported_with_the_likely_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDQ_CHEKPOINT", "/models/v1-5.safetensors")
    monkeypatch.setenv("SDQ_WORKER_METRIC_PORT", "9200")
    monkeypatch.setenv("SDQ_REDIS_URL", "redis://redis:6379/0")  # a setting: not reported
    monkeypatch.setenv("SDQ_NOTHING_LIKE_IT", "1")
    assert load_settings().checkpoint is None  # pydantic ignores it, hence the report
    warnings = unknown_variables()
    assert sorted(warnings) == [
        "SDQ_CHEKPOINT (in the environment) is not an sdqueue setting and is ignored; did you mean SDQ_CHECKPOINT?",
        "SDQ_NOTHING_LIKE_IT (in the environment) is not an sdqueue setting and is ignored",
        "SDQ_WORKER_METRIC_PORT (in the environment) is not an sdqueue setting and is ignored; "
        "did you mean SDQ_WORKER_METRICS_PORT?",
    ]


def test_a_misspelt_variable_in_the_dotenv_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SDQ_DEVICE=cpu\nSDQ_STORAGEE=s3\nMINIO_ROOT_USER=sdqueue\n")
    assert load_settings().storage == "local"
    assert unknown_variables() == [
        "SDQ_STORAGEE (in the .env) is not an sdqueue setting and is ignored; did you mean SDQ_STORAGE?"
    ]


def test_settings_in_any_case_and_the_compose_variables_are_not_reported(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("".join(f"{name}=x\n" for name in sorted(COMPOSE_VARIABLES)))
    environ = {"sdq_device": "cpu", "SDQ_LOG_LEVEL": "INFO", "PATH": "/usr/bin", "SDQ_SERVER": "http://api:8000",
               "SDQ_API_KEY": "sdq_x"}  # the client's variables
    assert unknown_variables(environ) == []


def test_cli_warns_about_a_misspelt_variable(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "SDQ_CHEKPOINT": "/models/x.safetensors", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "sdqueue", "apikey", "create", "alice"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    [warning] = [line for line in result.stderr.splitlines() if "SDQ_CHEKPOINT" in line]
    assert "WARNING" in warning and "did you mean SDQ_CHECKPOINT?" in warning


def settings_table() -> str:
    """A configuration table generated from `Settings`, to paste into the README."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = ("unset" if default is None else "empty" if default == "" else
                 f"`{str(default).lower()}`" if isinstance(default, bool) else f"`{default}`")
        meaning = field.description or ""
        if get_origin(field.annotation) is Literal:
            meaning += " One of " + ", ".join(f"`{c}`" for c in get_args(field.annotation)) + "."
        rows.append(f"| `SDQ_{name.upper()}` | {shown} | {meaning.strip()} |")
    return "\n".join(rows)


def test_readme_documents_every_setting() -> None:
    """Every SDQ_ variable has a row in the README's table, and the table lists no variable that does not exist.
    On failure the message holds the table generated from `Settings`, ready to paste."""
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(SDQ_[A-Z0-9_]+)` \|", readme, flags=re.MULTILINE))
    # The table also has the client's variables (`sdqueue submit`, sdqueue.client), which are no server settings.
    defined = {f"SDQ_{name.upper()}" for name in Settings.model_fields} | CLIENT_VARIABLES
    assert documented == defined, (
        f"missing from README.md: {sorted(defined - documented)}; not settings: {sorted(documented - defined)}\n"
        f"generated table:\n{settings_table()}"
    )
