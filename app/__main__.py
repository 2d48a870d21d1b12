"""``python -m app``: serve on LOCALAI_HOST:LOCALAI_PORT (what ``make run`` does)."""

import uvicorn

from app.config import get_settings
from app.main import create_asgi_app

if __name__ == "__main__":
    settings = get_settings()
    # A client that keeps a connection open must not hold the shutdown: 10 s, then close.
    uvicorn.run(
        create_asgi_app(settings),
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=10,
    )
