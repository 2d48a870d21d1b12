"""``python -m app``: serve on LOCALAI_HOST:LOCALAI_PORT (what ``make run`` does).

The CPU start-up settings (:mod:`app.platform.cpu_runtime`: glibc's allocator, when the CPU
computes) come first, before the app's modules import torch and start threads.
"""

import uvicorn

from app.config import get_settings
from app.platform import cpu_runtime


def main() -> None:
    settings = get_settings()
    tuning = cpu_runtime.tune_at_start_up(settings.cpu_tuning, settings.device)
    from app.main import create_asgi_app  # imports torch: after the tuning

    asgi_app = create_asgi_app(settings)  # configures logging
    tuning.log()
    # A client that keeps a connection open must not hold the shutdown: 10 s, then close.
    uvicorn.run(
        asgi_app,
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
