"""Where things live under the cache folder, and writing files so that a crash leaves no
half-written file behind (temporary file in the same folder, fsync, rename)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from app.config import EMBEDDED_MODEL_ID, Settings
from app.platform.disk_space import disk_full_error, is_disk_full

GENERATED_IMAGES_URL_PREFIX = "static/generated_images"
TEMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_writer(target: Path) -> Iterator[IO[bytes]]:
    """Yield a file that becomes ``target`` only if the block completes."""
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=TEMP_PREFIX)
    temp_path = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, target)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


class Storage:
    def __init__(self, settings: Settings) -> None:
        self.cache_dir = settings.cache_dir
        self.models_dir = settings.models_dir
        self.loras_dir = settings.loras_dir
        self.generated_images_dir = settings.generated_images_dir
        self.user_config_file = settings.user_config_file

    def ensure_dirs(self) -> None:
        for folder in (self.models_dir, self.loras_dir, self.generated_images_dir):
            folder.mkdir(parents=True, exist_ok=True)

    # --- models ---

    def model_dir_for(self, model_id: str) -> Path:
        return self.models_dir / model_id.replace("/", "--")

    @property
    def embedded_model_dir(self) -> Path:
        return self.model_dir_for(EMBEDDED_MODEL_ID)

    # --- LoRAs (names from Plan 006) ---

    def get_loras_dir(self) -> Path:
        return self.loras_dir

    # --- generated images ---

    def new_image_name(self, index: int) -> str:
        stamp = datetime.now(UTC).strftime("%Y%m%d_%H%M%S_%f")
        return f"{stamp}_{index}"

    def save_png(self, image: Image.Image, file_name: str, info: PngInfo | None = None) -> str:
        """Write ``file_name``.png atomically; returns its server-relative URL path."""
        target = self.generated_images_dir / f"{file_name}.png"
        try:
            with atomic_writer(target) as handle:
                image.save(handle, format="PNG", pnginfo=info)
        except OSError as error:
            if is_disk_full(error):
                raise disk_full_error("the generated images", self.generated_images_dir) from error
            raise
        return f"{GENERATED_IMAGES_URL_PREFIX}/{target.name}"

    def remove_unrecorded_images(self, recorded: set[str]) -> list[str]:
        """Remove what a crash left in the images folder: temporary files, and PNGs whose
        rows were never committed. Returns the names removed."""
        removed = []
        for entry in self.generated_images_dir.iterdir():
            if entry.is_file() and (
                entry.name.startswith(TEMP_PREFIX)
                or (entry.suffix == ".png" and entry.name not in recorded)
            ):
                entry.unlink(missing_ok=True)
                removed.append(entry.name)
        return removed

    def delete_generated_image(self, url_path: str) -> None:
        name = Path(url_path).name
        (self.generated_images_dir / name).unlink(missing_ok=True)

    # --- small JSON documents ---

    def read_json(self, path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError, RecursionError):  # absent, broken, absurd
            return {}
        return data if isinstance(data, dict) else {}

    def write_json(self, path: Path, data: dict[str, Any]) -> None:
        try:
            with atomic_writer(path) as handle:
                handle.write(json.dumps(data, indent=2).encode("utf-8"))
        except OSError as error:
            if is_disk_full(error):
                raise disk_full_error(f"'{path.name}'", path.parent) from error
            raise
