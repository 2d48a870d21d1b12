"""Settings read from the real environment (``monkeypatch.setenv`` sets real env vars)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import EMBEDDED_MODEL_ID, Settings

_VARIABLES = (
    "CACHE_DIR",
    "DATABASE_URL",
    "HOST",
    "PORT",
    "DEVICE",
    "DEFAULT_MODEL_ID",
    "LORA_MAX_FILE_SIZE",
    "LOG_LEVEL",
    "ALLOWED_ORIGINS",
    "ALLOWED_HOSTS",
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start each test from no LOCALAI_* variables, whatever the shell had set."""
    for name in _VARIABLES:
        monkeypatch.delenv(f"LOCALAI_{name}", raising=False)


def test_defaults() -> None:
    settings = Settings()
    assert settings.cache_dir == Path(".cache")
    assert settings.port == 8000
    assert settings.host == "127.0.0.1"
    assert settings.device == "auto"
    assert settings.default_model_id == EMBEDDED_MODEL_ID
    assert settings.lora_max_file_size == 500 * 1024 * 1024
    assert settings.database_url is None


def test_cache_dir_places_everything(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOCALAI_CACHE_DIR", str(tmp_path / "cache"))
    settings = Settings()
    cache = tmp_path / "cache"
    assert settings.cache_dir == cache
    assert settings.models_dir == cache / "models"
    assert settings.loras_dir == cache / "loras"
    assert settings.generated_images_dir == cache / "generated_images"
    assert settings.user_config_file == cache / "user_config.json"
    assert settings.resolved_database_url == f"sqlite+aiosqlite:///{cache.resolve()}/localai.db"


def test_port_and_size_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALAI_PORT", "8123")
    monkeypatch.setenv("LOCALAI_LORA_MAX_FILE_SIZE", "1024")
    monkeypatch.setenv("LOCALAI_LOG_LEVEL", "DEBUG")
    settings = Settings()
    assert (settings.port, settings.lora_max_file_size, settings.log_level) == (8123, 1024, "DEBUG")


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("PORT", "abc", "port"),
        ("PORT", "0", "port"),
        ("PORT", "70000", "port"),
        ("DEVICE", "gpu", "device"),
        ("DEVICE", "cuda:x", "device"),
        ("DATABASE_URL", "postgres://user@localhost/db", "database_url"),
        ("DATABASE_URL", "sqlite:///plain.db", "database_url"),
        ("LORA_MAX_FILE_SIZE", "0", "lora_max_file_size"),
        ("LOG_LEVEL", "CHATTY", "log_level"),
    ],
)
def test_bad_values_fail_at_start_up(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, field: str
) -> None:
    monkeypatch.setenv(f"LOCALAI_{name}", value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert [error["loc"] for error in caught.value.errors()] == [(field,)]
    assert field in str(caught.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("cuda:1", "cuda:1"), (" CUDA ", "cuda"), ("cpu", "cpu"), ("mps", "mps"), ("auto", "auto")],
)
def test_device_values_accepted(monkeypatch: pytest.MonkeyPatch, value: str, expected: str) -> None:
    monkeypatch.setenv("LOCALAI_DEVICE", value)
    assert Settings().device == expected


def test_database_url_overrides_the_default_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALAI_DATABASE_URL", "sqlite+aiosqlite:////tmp/elsewhere.db")
    assert Settings().resolved_database_url == "sqlite+aiosqlite:////tmp/elsewhere.db"


def test_allowed_origins_and_hosts_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (Settings().allowed_origins, Settings().allowed_hosts) == ((), ())
    monkeypatch.setenv("LOCALAI_ALLOWED_ORIGINS", " https://studio.example, http://tablet:8080 ,")
    monkeypatch.setenv("LOCALAI_ALLOWED_HOSTS", "workstation.lan,192.168.1.5,[fe80::1]:8000")
    settings = Settings()
    assert settings.allowed_origins == ("https://studio.example", "http://tablet:8080")
    assert settings.allowed_hosts == ("workstation.lan", "192.168.1.5", "[fe80::1]:8000")


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("ALLOWED_ORIGINS", "studio.example", "'studio.example' is not an origin"),
        ("ALLOWED_ORIGINS", "https://studio.example/path", "is not an origin"),
        ("ALLOWED_HOSTS", "http://workstation.lan", "is not a host name"),
        ("ALLOWED_HOSTS", "work station", "is not a host name"),
    ],
)
def test_a_malformed_allowlist_entry_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    monkeypatch.setenv(f"LOCALAI_{variable}", value)
    with pytest.raises(ValidationError, match=says):
        Settings()
