"""CivitAI's model-version document as its API answers it (``/api/v1/model-versions/{id}``),
for the fake remote to serve."""

from __future__ import annotations

import hashlib
from typing import Any


def civitai_version_document(
    version_id: int,
    data: bytes,
    download_url: str,
    *,
    model_id: int,
    file_name: str,
    sha256: str | None,
    trained_words: tuple[str, ...],
    model_type: str,
    base_model: str,
) -> dict[str, Any]:
    """The version's JSON, naming the file's real sha256 unless ``sha256`` says otherwise."""
    listed = sha256 or hashlib.sha256(data).hexdigest()
    return {
        "id": version_id,
        "modelId": model_id,
        "name": f"v{version_id}",
        "baseModel": base_model,
        "trainedWords": list(trained_words),
        "model": {"name": f"Model {model_id}", "type": model_type, "nsfw": False},
        "files": [
            {
                "id": version_id * 10,
                "name": file_name,
                "sizeKB": len(data) / 1024,
                "type": "Model",
                "primary": True,
                "metadata": {"format": "SafeTensor", "size": "pruned", "fp": "fp16"},
                "hashes": {
                    "AutoV2": listed[:10].upper(),
                    "SHA256": listed.upper(),
                    "CRC32": "0BADC0DE",
                },
                "downloadUrl": download_url,
            }
        ],
    }
