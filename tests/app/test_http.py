"""HTTP conventions every route shares: unexpected errors are JSON 500s a browser can read."""

from __future__ import annotations

from sqlalchemy import text

from app.config import EMBEDDED_MODEL_ID, Settings
from tests.harness import running_app

ORIGIN = "http://localhost:3000"


async def test_a_server_error_carries_cors_headers(settings: Settings) -> None:
    # Without CORS headers the browser reports a CORS failure instead of the 500.
    async with running_app(settings, raise_app_exceptions=False) as (app, client):
        async with app.state.session_factory() as session:
            # A real database fault: SQLite refuses to delete model rows.
            await session.execute(
                text(
                    "CREATE TRIGGER keep_models BEFORE DELETE ON models "
                    "BEGIN SELECT RAISE(ABORT, 'refused'); END"
                )
            )
            await session.commit()
        response = await client.delete(
            "/models", params={"model_id": EMBEDDED_MODEL_ID}, headers={"Origin": ORIGIN}
        )
        assert response.status_code == 500
        assert response.json() == {"detail": "Internal server error"}
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert response.headers["access-control-allow-credentials"] == "true"
        # The server goes on answering on the same client.
        assert (await client.get("/", headers={"Origin": ORIGIN})).status_code == 200
