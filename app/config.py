"""Typed settings from the environment (prefix ``LOCALAI_``); bad values fail at start-up."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
MiB = 1024 * 1024
EMBEDDED_MODEL_ID = "embedded/tiny-sd"


class Settings(BaseSettings):
    """Everything an operator can set. Paths derived from ``cache_dir`` live here too."""

    model_config = SettingsConfigDict(env_prefix="LOCALAI_", env_file=None, extra="ignore")

    cache_dir: Path = Field(
        default=Path(".cache"),
        description="Holds models/, loras/, generated_images/ and the SQLite database.",
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy async URL; default: SQLite file in cache_dir."
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    allowed_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Web origins allowed besides http(s)://localhost, 127.0.0.1 and [::1] on "
        "any port and app://- (the packaged UI); comma-separated; * allows every origin.",
    )
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Host names the server answers to besides localhost, 127.0.0.1, [::1] "
        "and the LOCALAI_HOST address; comma-separated; * allows every name.",
    )
    device: str = Field(
        default="auto",
        description="auto, cpu, mps, cuda or cuda:N. Overrides the device chosen in the UI.",
    )
    default_model_id: str = Field(
        default=EMBEDDED_MODEL_ID, description="Model loaded when the UI asks for no other."
    )
    lora_max_file_size: int = Field(default=500 * MiB, gt=0, description="Upload limit, bytes.")
    lora_cache_max_count: int = Field(
        default=16,
        ge=0,
        description="LoRAs kept prepared for the loaded model; 0 loads and unloads every "
        "LoRA through diffusers on every generation (Plan 006's behaviour).",
    )
    lora_cache_max_bytes: int = Field(
        default=2048 * MiB, ge=0, description="Memory the prepared LoRAs may use, bytes."
    )
    huggingface_base_url: str = Field(
        default="https://huggingface.co",
        description="Where Hugging Face files are fetched (/{repo_id}/resolve/{revision}/{file}).",
    )
    huggingface_token: SecretStr | None = Field(
        default=None,
        description="Hugging Face access token for gated or private model repositories; "
        "never logged nor stored. A request's own hf_token takes precedence.",
    )
    lookup_timeout: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="Seconds one lookup at a remote service may take in all, retries "
        "included: the Hub's model info and search, CivitAI's model-version lookup before a "
        "LoRA download.",
    )
    model_download_stall_timeout: float = Field(
        default=300.0,
        gt=0,
        description="A model download that receives less than 64 KiB in this many seconds "
        "fails (a dead or trickling connection).",
    )
    civitai_base_url: str = Field(
        default="https://civitai.com", description="CivitAI site and API (/api/v1/...)."
    )
    lora_download_max_parallel: int = Field(
        default=3, ge=1, le=16, description="LoRA downloads running at once; the rest queue."
    )
    lora_download_attempts: int = Field(
        default=4,
        ge=1,
        le=10,
        description="Tries per download after connection errors (resuming where possible).",
    )
    lora_download_retry_delay: float = Field(
        default=1.0, ge=0, le=60, description="Seconds before the first retry; doubles each time."
    )
    lora_download_timeout: float = Field(
        default=30.0, gt=0, le=600, description="Seconds to connect, or to wait for more data."
    )
    lora_download_stall_timeout: float = Field(
        default=120.0,
        gt=0,
        description="A LoRA download that receives less than 64 KiB in this many seconds "
        "fails, without retrying (a server trickling bytes, which lora_download_timeout "
        "never catches).",
    )
    lora_download_deadline: float = Field(
        default=4 * 3600.0,
        gt=0,
        description="Seconds one LoRA download may take from the moment it starts "
        "(time in the queue not counted); then it fails.",
    )
    lora_download_max_queued: int = Field(
        default=50,
        ge=1,
        description="LoRA downloads not yet finished (queued and running); more are refused "
        "with 429.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    cpu_tuning: bool = Field(
        default=True,
        description="At start-up, when the CPU computes: glibc keeps large freed buffers "
        "(mallopt) instead of unmapping and faulting them in again every step; given back "
        "when a model is unloaded (app.platform.cpu_runtime). MALLOC_* variables and "
        "glibc.malloc tunables the user set are kept.",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_PATTERN.match(value):
            raise ValueError("must be one of auto, cpu, mps, cuda, cuda:N")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("sqlite+aiosqlite://"):
            raise ValueError("only SQLite through aiosqlite is supported: sqlite+aiosqlite:///PATH")
        return value

    @field_validator("allowed_origins", "allowed_hosts", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _check_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            if origin not in ("*", "null") and not re.match(
                r"^[a-z][a-z0-9+.-]*://[^/?#\s]+$", origin, re.I
            ):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], or *)")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _check_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for host in value:
            if host != "*" and not re.match(
                r"^(\[[0-9a-fA-F:.]+\]|[^:/\s\[\]]+)(:\d{1,5})?$", host
            ):
                raise ValueError(f"{host!r} is not a host name (name, IPv4, [IPv6], or *)")
        return value

    @field_validator("huggingface_base_url", "civitai_base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not re.match(r"^https?://[^/?#]+(/[^?#]*)?$", value):
            raise ValueError("must be an http:// or https:// URL without query")
        return value

    @property
    def models_dir(self) -> Path:
        return self.cache_dir / "models"

    @property
    def loras_dir(self) -> Path:
        return self.cache_dir / "loras"

    @property
    def generated_images_dir(self) -> Path:
        return self.cache_dir / "generated_images"

    @property
    def user_config_file(self) -> Path:
        return self.cache_dir / "user_config.json"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.cache_dir / 'localai.db').resolve()}"


class ConfigurationError(SystemExit):
    """Bad settings: stops the process with a message naming each bad variable."""


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        problems = [
            f"  LOCALAI_{'_'.join(str(part) for part in item['loc']).upper()}: {item['msg']}"
            for item in error.errors()
        ]
        raise ConfigurationError(
            "Invalid settings in the environment:\n" + "\n".join(problems)
        ) from None


@lru_cache
def get_settings() -> Settings:
    """Settings read once from the environment."""
    return load_settings()
