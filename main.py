"""Entry point for ``uvicorn main:app`` (the desktop UI's launcher runs exactly that)."""

from app.main import create_asgi_app

app = create_asgi_app()
