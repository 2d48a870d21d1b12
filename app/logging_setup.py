"""Log format and the silencing of libraries that print noise on every call."""

from __future__ import annotations

import logging
import os
import warnings


def configure_logging(level: str) -> None:
    # No force=True: a host that configured logging already (uvicorn, pytest) keeps it.
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
    logging.getLogger("app").setLevel(level)
    # transformers prints a false "newly initialized" load report and optional-dependency
    # hints (torchvision) on every load; peft repeats "Already found a peft_config".
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("transformers", "diffusers", "peft", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
